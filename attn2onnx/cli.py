"""The ``attn2onnx`` command: parses arguments and dispatches to a subcommand module.

Each subcommand lives in its own module ``attn2onnx.commands.<name>`` with
    HELP: str                          one line for ``attn2onnx --help``
    configure(parser) -> None          adds its arguments to its argparse sub-parser
    run(args) -> int | None            does the work (exit status; None means 0)
and is listed in ``COMMANDS``. Modules import heavy dependencies (torch, onnx, the op set) inside
``run``, after checking their arguments and files, so that ``--help``, a usage error or a missing
file answer without importing torch (tests/test_cli_startup.py, benchmarks/cli.py).

Errors a user can fix (UsageError, VariantError, OSError such as a missing file, MemoryError
for sizes past the machine) are printed as one line ``attn2onnx: error: ...`` on stderr with
exit status 2; anything else is a bug and keeps its traceback. ATTN2ONNX_DEBUG=1 shows the
traceback for every error. An argument that is not UTF-8 (bytes in a file name or a prompt)
is such an error before the command runs: ONNX and ONNX Runtime take UTF-8 paths only.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from . import __version__
from .errors import UsageError
from .utf8 import check_utf8, printable
from .variants import VariantError

PROG = "attn2onnx"
# Subcommands in help order: name -> module under attn2onnx.commands.
COMMANDS: dict[str, str] = {
    "variants": "variants",
    "new": "new",
    "convert": "convert",
    "export": "export",
    "optimize": "optimize",
    "quantize": "quantize",
    "run": "run",
    "generate": "generate",
    "validate": "validate",
    "demo": "demo",
    "build-engine": "build_engine",
    "doctor": "doctor",
}
EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (no usage dump) in the project's error format."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Export transformers with non-standard attention to ONNX, run them fast, prove parity.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f".commands.{module_name}", __package__)
        doc = (module.__doc__ or module.HELP).strip()
        cmd = sub.add_parser(
            name, help=module.HELP, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.configure(cmd)
        labels = {
            a.dest: max(a.option_strings, key=len) if a.option_strings else str(a.metavar or a.dest)
            for a in cmd._actions
        }
        cmd.set_defaults(_run=module.run, _labels=labels)
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """UsageError for the first argument (a string, path or list of them) that is not UTF-8."""
    labels = getattr(args, "_labels", {})
    for dest, value in vars(args).items():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            text = os.fspath(item) if isinstance(item, (str, os.PathLike)) else None
            if isinstance(text, str) and not dest.startswith("_"):
                check_utf8(text, f"argument {labels.get(dest, dest)}:")


def is_user_error(error: BaseException) -> bool:
    """Errors that get one line and exit 2 instead of a traceback."""
    return isinstance(error, (UsageError, VariantError, OSError, MemoryError))


def error_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.strerror}: {error.filename}"
    else:
        text = str(error)
    text = printable(" ".join(text.split()))  # a path of bytes that are not UTF-8 prints escaped
    if isinstance(error, MemoryError):  # numpy says "Unable to allocate ...", Python often nothing
        return f"out of memory ({text})" if text else "out of memory"
    return text or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        check_arguments(args)
        status = args._run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line for user errors, traceback for bugs
        if not is_user_error(error) or os.environ.get("ATTN2ONNX_DEBUG"):
            raise
        print(f"{PROG}: error: {error_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
