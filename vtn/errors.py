"""The one exception type the CLI prints as a plain message (no traceback): bad input, not a bug."""


class UserError(ValueError):
    """Bad input from the user: a wrong path, a mismatched cache, an unknown config key.

    The message must name the culprit (file, id, key) and the problem. The CLI prints it and exits 2.
    """
