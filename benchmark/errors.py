"""User-facing errors: reported as one line with exit code 2, never as a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input (config, CLI, names, paths). The CLI prints it as one line."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> UserError:
    """Build the standard 'unknown X' error with the valid choices and a did-you-mean suggestion."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"unknown {kind} {name!r}{hint}; valid {kind}s: {', '.join(valid) or '(none)'}")
