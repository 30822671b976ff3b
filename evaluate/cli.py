"""`vtn` subcommands of this stage."""


def register(sub, bench_sub) -> None:
    """Add this stage's subcommands to `vtn` and its benchmarks to `vtn bench`."""
