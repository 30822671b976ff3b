"""`vtn`: one console command; each stage registers its own subcommands, and vtn/bench/cli.py the benchmarks.

Those modules (`<stage>/cli.py`, vtn/bench/cli.py, vtn/demo.py) import only argparse at module level, so
`vtn --help` is instant; the heavy imports (torch, timm, zarr) happen inside the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vtn import __version__
from vtn.errors import UserError

# In this order in `vtn --help`; vtn.bench.cli adds `vtn bench` and every benchmark under it.
COMMANDS = ("vtn.bench.cli", "vtn.store.cli", "vtn.extract.cli", "vtn.temporal.cli", "vtn.evaluate.cli", "vtn.demo", "vtn.ablate")


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations (`--epoch 3` is refused, never taken as --epochs), and an unknown flag
    reported by the (sub)command it was given to, with its usage line and the closest flags it has. Every
    subcommand's parser is of this class (add_subparsers makes its parsers of the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # The innermost subcommand sets this last: a subparser's namespace is copied into its parent's.
        namespace = namespace if namespace is not None else argparse.Namespace()
        namespace._parser = self
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):
        args, extras = self.parse_known_args(args, namespace)
        parser = args.__dict__.pop("_parser", self)
        if extras:
            parser.unknown(extras)
        return args

    def unknown(self, extras: list[str]) -> None:
        """Exit (status 2) naming the arguments this command does not take, and the flags closest to each."""
        import difflib

        flags = [f for f in self._option_string_actions if f.startswith("--")]
        hints = []
        for arg in extras:
            close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=3, cutoff=0.6) if arg.startswith("-") else []
            if close:
                hints.append(f"{arg}: did you mean {' or '.join(close)}?")
        self.error(f"unrecognized arguments: {' '.join(extras)}" + "".join(f"\n  {h}" for h in hints)
                   + f"\n  (`{self.prog} --help` lists its flags)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vtn",
        description="Video Transformer Network as a two-stage feature cache: `vtn extract` caches one "
        "feature vector per frame in a Zarr store, `vtn train` trains the Longformer temporal encoder on "
        "it in minutes, `vtn evaluate` measures it on a cache and `vtn predict` on new video files. `vtn demo` runs "
        "all of it on generated videos.",
    )
    parser.add_argument("--version", action="version", version=f"vtn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # output still buffered meets a closed pipe here, inside this handler, not at exit
        return code
    except UserError as e:
        print(f"vtn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "interrupted", "committed work is kept, re-run to continue")
        print(f"vtn {args.command}: interrupted; {hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`vtn store info CACHE | head`): stop quietly, as Unix tools do. Point stdout at
        # devnull so the interpreter's final flush of the buffered rest does not raise the error again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command a closed pipe stopped
