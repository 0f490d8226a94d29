"""One exception type for every mistake a user can make.

The CLI prints these as a single line (no traceback unless --debug) and exits non-zero; anything
else escaping is a bug in sokd, not in the user's input.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class SokdError(Exception):
    """A problem with the user's input (config, data, checkpoint, arguments) and how to fix it."""


def suggest(name: str, valid: Iterable[str]) -> str:
    """' (did you mean X?)' when a close valid name exists, else ''."""
    match = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown(kind: str, name: str, valid: Iterable[str]) -> SokdError:
    """Error for a name that is not registered, listing the valid ones."""
    valid = sorted(valid)
    return SokdError(f"unknown {kind} '{name}'{suggest(name, valid)}; valid: {', '.join(valid)}")
