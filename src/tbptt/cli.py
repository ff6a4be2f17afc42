"""The ``tbptt`` command line: one subcommand per module, each registering its own parser.

A subcommand's module defines ``register(subparsers)``, which adds its parser and sets
``func(args) -> int`` as the parser's default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# subcommand modules, in the order `tbptt --help` lists them
COMMANDS = [
    "tbptt.commands.demo",
    "tbptt.commands.compare",
    "tbptt.commands.train",
    "tbptt.commands.probe",
    "tbptt.commands.check",
    "tbptt.commands.schedule",
    "tbptt.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tbptt",
        description="Train recurrent networks with TBPTT(k1, k2) and see what k1 and k2 do.",
    )
    parser.add_argument("--version", action="version", version=f"tbptt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a subcommand not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
