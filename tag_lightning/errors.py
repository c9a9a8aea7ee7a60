"""What a user's mistake looks like: one line that says what is wrong and where, never a traceback.

Library code raises `UserError` (or `BadValue`, a checked value or file content), and the standard
library `OSError` for bad paths; the `tag` command turns each into one line on stderr and exit
status 2 (`cli.main`). Anything else is a bug: its traceback is shown, exit status 1.
``TAG_DEBUG=1`` shows the traceback of a user's mistake too.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Something the user gave cannot work (a path, a value, a file's content); the message says how to fix it."""


class BadValue(UserError, ValueError):
    """A value or file content our code checked and refuses: a `UserError`, and a `ValueError` for the
    code that catches those while parsing. A plain `ValueError` that reaches `cli.main` is a bug."""


def describe(err: BaseException) -> str:
    """`err` as one line: ``PATH: what happened`` for OS errors, the message itself otherwise."""
    if isinstance(err, OSError) and err.filename is not None:
        # our only source of EEXIST is `mkdir(exist_ok=True)` meeting a file, whose "File exists" misleads
        what = "exists and is not a folder" if err.errno == errno.EEXIST else err.strerror or str(err)
        target = f" -> {err.filename2}" if err.filename2 is not None else ""
        return f"{err.filename}{target}: {what}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def read_yaml(path: str | Path) -> Any:
    """A YAML file's document; a syntax error names the file, line and column."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        try:
            return yaml.safe_load(handle)
        except yaml.YAMLError as err:
            mark, context = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(err, "problem", None) or str(err)
            if context is not None and getattr(err, "context", None):  # where the broken construct began
                problem = f"{err.context} from line {context.line + 1}: {problem}"
            raise UserError(f"{where}: not valid YAML ({problem})") from None
