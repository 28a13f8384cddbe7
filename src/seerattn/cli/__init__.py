"""The ``seerattn`` command line: thin wrappers around library functions.

Each subcommand lives in its own module of this package exposing ``register(subparsers)``, which
adds its parser and sets ``func`` (called with the parsed arguments, returns an exit code).
Modules are imported only when the CLI starts, never by ``import seerattn``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("quickstart", "env", "convert", "distill", "eval")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="seerattn",
        description="Learned block-sparse attention (SeerAttention) for Hugging Face LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"seerattn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
