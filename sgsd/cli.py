"""The `sgsd` command line.

Each subcommand lives in its own module under `sgsd/commands/` and is found
automatically. A command module defines:

    NAME = "verify"                   # the subcommand
    HELP = "one line for sgsd --help"
    def add_arguments(parser): ...    # argparse arguments (may add nested subparsers)
    def run(args) -> int: ...         # exit status

Command modules import heavy libraries (torch, transformers) inside `run`, so
`sgsd --help` stays fast. A `UserError` is printed on one line (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from sgsd import __version__
from sgsd.errors import UserError


def _command_modules():
    import sgsd.commands as pkg

    mods = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mods.append(importlib.import_module(f"sgsd.commands.{info.name}"))
    return sorted(mods, key=lambda m: m.NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgsd",
        description="Skill-Conditioned Gated Self-Distillation: train, evaluate, build skill banks, report.",
    )
    parser.add_argument("--version", action="version", version=f"sgsd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"sgsd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sgsd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
