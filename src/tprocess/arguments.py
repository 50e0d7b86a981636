"""The command line's grammar: one argparse parser per command.

`tprocess start`, `stop` and `status` in their plain forms never come here (cli.py reads
them directly: argparse and the `re` and `enum` it imports are ~7 ms of a `stop`); this
module answers everything else, and every mistake, --help and --version.
"""

from __future__ import annotations

import argparse
import os
import sys

from .checks import DEFAULT_NAME
from .cli import COMMANDS, EXIT_USAGE, LOG_LEVELS, VERSION, UserError, log_level

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def parse(argv: list[str]) -> argparse.Namespace:
    """The command's arguments (argv[0] is the command); UserError on a mistake."""
    if argv[0] in COMMANDS:
        # only the command's own parser: building all of them costs milliseconds (gettext, formatters)
        parser = Parser(prog=f"tprocess {argv[0]}", description=COMMANDS[argv[0]][0],
                        allow_abbrev=False, formatter_class=Formatter)
        value_flags = add_options(argv[0], parser)
        return parser.parse_args(glue_option_values(argv[1:], value_flags))
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        raise UserError(f"unrecognized option {argv[0]!r}: the command comes first "
                        f"(one of {', '.join(COMMANDS)})")
    return build_parser().parse_args(argv)  # --help, --version or an unknown command


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one `tprocess: error:` line (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message, EXIT_USAGE)


class Formatter(argparse.HelpFormatter):
    """Sized here: argparse's own sizing imports shutil, milliseconds on every command."""

    def __init__(self, prog: str, **kwargs: object) -> None:
        kwargs.setdefault("width", _help_width())
        super().__init__(prog, **kwargs)  # type: ignore[arg-type]


def _help_width() -> int:
    """As shutil.get_terminal_size: $COLUMNS, else the terminal's width, else 80; minus 2."""
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() else 0
    if width <= 0:
        try:
            width = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            width = 0
    return (width or 80) - 2


def glue_option_values(words: list[str], value_flags: dict[str, str]) -> list[str]:
    """`--timeout -inf` -> `--timeout=-inf`: an option's value is the next word, whatever it is.

    argparse would not take a value starting with '-' (`--name -x`, `--timeout -inf`)
    and would report a missing value instead of naming the bad one.
    """
    glued: list[str] = []
    rest = iter(words)
    for word in rest:
        if word == "--":
            glued += [word, *rest]
            break
        value = next(rest, None) if word in value_flags else None
        glued.append(word if value is None else f"{value_flags[word]}={value}")
    return glued


def build_parser() -> Parser:
    """The whole command line, for --help, --version and unknown commands."""
    parser = Parser(prog="tprocess", allow_abbrev=False, formatter_class=Formatter,
                    description="Keep N named Python worker processes alive under one master.")
    parser.add_argument("--version", action="version", version=VERSION)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, (summary, _) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary, allow_abbrev=False,
                                  formatter_class=Formatter)
        add_options(name, sub)
    return parser


class Arguments:
    """Adds one command's arguments to its parser, noting the options that take a value."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.value_flags: dict[str, str] = {}  # flag -> long flag, for glue_option_values

    def value(self, *flags: str, **kwargs: object) -> None:
        self.parser.add_argument(*flags, **kwargs)  # type: ignore[arg-type]
        self.value_flags.update(dict.fromkeys(flags, flags[-1]))  # the long flag comes last

    def switch(self, *flags: str, help: str, dest: str | None = None) -> None:
        self.parser.add_argument(*flags, action="store_true", help=help, **({"dest": dest} if dest else {}))

    def positional(self, dest: str, help: str, optional: bool = False) -> None:
        self.parser.add_argument(dest, nargs="?" if optional else None, metavar=dest.upper(), help=help)

    def instance(self) -> None:
        self.value("--name", help=f"instance name (default {DEFAULT_NAME!r})")
        self.value("-c", "--config", metavar="FILE", dest="config_file",
                   help="take the name from this config file")


def add_options(command: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    """Add a command's arguments; return its options that take a value (flag -> long flag)."""
    parser.set_defaults(run=COMMANDS[command][1])
    args = Arguments(parser)
    if command == "start":
        _start_arguments(args)
        return args.value_flags
    if command in ("enqueue", "queue"):  # the queue package is imported for these two only
        from .queue import commands as queue_commands

        if command == "enqueue":
            queue_commands.add_enqueue_arguments(parser)
        else:
            queue_commands.add_queue_arguments(parser)
        return dict(queue_commands.VALUE_FLAGS)
    args.instance()
    if command == "stop":
        args.value("--timeout", type=_seconds, metavar="S",
                   help="seconds workers may take to finish (default: each group's graceful_timeout)")
    elif command == "status":
        args.switch("--json", dest="as_json", help="print JSON instead of a table")
    elif command == "top":
        args.value("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between samples (default 1)")
    elif command == "logs":
        args.value("-n", "--lines", type=_integer(low=0), default=20, metavar="LINES",
                   help="how many of the last lines to print (default 20)")
        args.switch("-f", "--follow", help="then print new lines as they come, across log rotations, "
                    "until Ctrl-C")
    elif command == "scale":
        args.positional("group", "the group (may be left out if there is only one)", optional=True)
        args.positional("count", "the new number of workers, or +K / -K")
    return args.value_flags


def _start_arguments(args: Arguments) -> None:
    args.positional("task", "FILE.py:function or module:function", optional=True)
    args.value("-n", "--workers", type=_integer(), metavar="N", help="number of workers for TASK (default 1)")
    args.value("-c", "--config", metavar="FILE", dest="config_file",
               help="TOML file with the name and groups")
    args.value("--name", help=f"instance name and title prefix (default {DEFAULT_NAME!r})")
    args.switch("-d", "--daemon", help="detach; return once every worker is up")
    args.value("--log-file", metavar="FILE",
               help="log file (default for -d: ~/.local/state/tprocess/NAME.log)")
    args.value("--graceful-timeout", type=_seconds, metavar="S", help="seconds a stopping worker may take")
    args.value("--log-level", type=_log_level, default="INFO", metavar="LEVEL",
               help=f"{', '.join(LOG_LEVELS)} (default INFO)")
    args.value("--metrics", metavar="HOST:PORT", help="serve metrics over HTTP at this address")


def _integer(low: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number, at least `low`; the error names the text as given."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return value

    return parse


def _seconds(text: str) -> float:
    """An argparse type; the range (no NaN, no inf, no negative) is checked with the config's rules."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None


def _log_level(text: str) -> str:
    try:
        return log_level(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}") from None
