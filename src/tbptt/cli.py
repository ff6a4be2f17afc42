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


def _value_flags(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """The option strings of ``parser`` and its subcommands: all of them, and those taking one value."""
    every, valued = set(), set()
    for action in parser._actions:  # noqa: SLF001
        every.update(action.option_strings)
        if action.option_strings and action.nargs is None and isinstance(action, (argparse._StoreAction,
                                                                                    argparse._AppendAction)):
            valued.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                more, more_valued = _value_flags(sub)
                every |= more
                valued |= more_valued
    return every, valued


def joined_values(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with a value that starts with "-" joined to its flag (``--config -1,5`` becomes
    ``--config=-1,5``), so that argparse reads it as the flag's value, which is then checked (and
    reported) as a value, rather than failing with "expected one argument"."""
    every, valued = _value_flags(parser)
    out: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item in valued and i + 1 < len(items) and items[i + 1].startswith("-") and items[i + 1] not in every \
                and items[i + 1] != "--":
            out.append(f"{item}={items[i + 1]}")
            i += 2
            continue
        out.append(item)
        i += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(joined_values(sys.argv[1:] if argv is None else argv, parser))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
