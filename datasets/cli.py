"""Command-line conventions every command of the project follows (`new_parser`; in the bottom
package, which every command's package already imports):

- ``--version`` prints the installed version;
- ``--help`` shows each flag's default once (none where the help text already says it, and none for
  switches), defaults as they are typed (``120 120 78``, not a Python tuple), and plain text (no
  reStructuredText markup from docstrings);
- the program name is the console script a user typed (``glioma-study``) or ``python -m MODULE``;
- flags sit in groups by job (`group`), required ones in their own group.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed

DISTRIBUTION = "glioma-survival-study"
# module -> console script (pyproject.toml's [project.scripts] lists the same pairs)
SCRIPTS = {"study.run": "glioma-study", "datasets.convert": "glioma-convert", "analysis.report": "glioma-report",
           "study.predict": "glioma-predict", "study.tracking": "glioma-tracking"}


def version() -> str:
    try:
        return installed(DISTRIBUTION)
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def plain(text: str) -> str:
    """Help text without reStructuredText markup (``code``, `role`)."""
    return re.sub(r"``([^`]+)``|`([^`]+)`", lambda m: m.group(1) or m.group(2), text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" once: not where the help says it, not for switches or None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS) or action.default in ([], ())
                or isinstance(action, (argparse._StoreTrueAction, argparse._VersionAction, argparse._HelpAction))
                or action.option_strings == []):
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


def program(module: str) -> str:
    """The name a user typed: the console script, else ``python -m MODULE``."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script if script == SCRIPTS.get(module) else f"python -m {module}"


def new_parser(module: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program(module), description=plain(description), epilog=epilog,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return parser
