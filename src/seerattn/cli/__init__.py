"""The ``seerattn`` command line: thin wrappers around library functions.

Each subcommand lives in its own module of this package exposing ``register(subparsers)``, which
adds its parser and sets ``func`` (called with the parsed arguments, returns an exit code).
Modules are imported only when the CLI starts, never by ``import seerattn``.

User errors (bad arguments, recipes, paths, files: ``ValueError`` -- which includes ``ConfigError`` --
``FileNotFoundError``, ``FileExistsError``) print one line and exit with status 2, as argparse's usage
errors do; ``seerattn --debug ...`` or ``SEERATTN_DEBUG=1`` shows the traceback instead. So does a
missing optional package (``ModuleNotFoundError`` for one of :data:`OPTIONAL_EXTRAS`): the line names
the extra that installs it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("quickstart", "env", "convert", "merge", "distill", "finetune", "eval")
# What a user can fix from the message alone: reported in one line (exit 2) unless debugging.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
# Optional packages -> the extra of pyproject.toml that installs them.
OPTIONAL_EXTRAS = {"datasets": "data", "peft": "lora", "matplotlib": "eval", "transformers": "hf", "triton": "triton"}


def _missing_extra(e: ModuleNotFoundError) -> str | None:
    """The one-line message for a missing optional package, None for any other missing module (a bug)."""
    top = (e.name or "").split(".")[0]
    if top not in OPTIONAL_EXTRAS:
        return None
    hint = f"pip install 'seerattn[{OPTIONAL_EXTRAS[top]}]'"
    message = " ".join(str(e).split())
    return message if hint in message else f"{message}: the optional package {top!r} is not installed ({hint})"


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="seerattn",
        description="Learned block-sparse attention (SeerAttention) for Hugging Face LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"seerattn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of user errors instead of one line (also: SEERATTN_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    debug = args.debug or os.environ.get("SEERATTN_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__  # one line, even for multi-line messages
    except ModuleNotFoundError as e:
        message = _missing_extra(e)
        if debug or message is None:
            raise
    print(f"seerattn {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
