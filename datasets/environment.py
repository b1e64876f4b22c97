"""Settings read from environment variables, checked where they are used (never at import, so a
bad value is a clear error of the command that reads it, not a traceback of every command)."""

from __future__ import annotations

import math
import os

from datasets.errors import InputError


def seconds(name: str, default: float) -> float:
    """A number of seconds >= 0 from the environment variable `name` (`default` if unset or empty)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise InputError(f"environment variable {name}={value!r}: expected a number of seconds >= 0 (e.g. {default:g})")
    return number
