"""What the user typed, made usable: shell words, options (IPython's magic_arguments), ``{name}`` values."""

from __future__ import annotations

import argparse
import re
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument

_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
# {{name}} is an escaped {name}; any other brace (JSON, code, Jinja) is sent as written.
_VARIABLE = re.compile(rf"\{{\{{({_NAME})\}}\}}|\{{({_NAME})\}}")

# -h/--help on every parser: printed, not argparse's exit, which would end an IPython cell badly.
HELP = argument("-h", "--help", action="store_true", help="show this help")


def interpolate(text: str, namespace: dict[str, Any]) -> str:
    """Replace ``{name}`` / ``{name.attr}`` by values from ``namespace``; unknown names stay as written."""

    def value(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            return "{" + match.group(1) + "}"
        head, *attrs = match.group(2).split(".")
        if head not in namespace:
            return match.group(0)
        obj = namespace[head]
        for attr in attrs:
            if not hasattr(obj, attr):
                return match.group(0)
            obj = getattr(obj, attr)
        return str(obj)

    return _VARIABLE.sub(value, text)


def parse_options(magic: Any, argv: list[str]) -> argparse.Namespace | None:
    """``argv`` parsed by ``magic``'s parser (``magic_arguments``); None after printing its ``--help``.

    Bad options are one UsageError that names the magic and points at its help.
    """
    parser = magic.parser
    prog = "%" + parser.prog
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        raise UsageError(f"{prog}: {exc} (see {prog} --help)") from None
    if args.help:
        print(parser.format_help())
        return None
    return args


def split(line: str) -> list[str]:
    """Shell-like words, quotes removed (IPython's own ``arg_split`` keeps them on POSIX)."""
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse the options {line!r}: {exc}") from None
