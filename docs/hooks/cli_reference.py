"""MkDocs hook: the command-line reference (docs/reference/cli.md), rendered from the commands' own
argparse parsers at build time, never copied by hand.

`parsers()` is also what tests/test_docs.py parses every documented command line with, so the
reference and that check read the same parsers. `analysis.report` builds its parser inside `main`;
until it has a `build_parser`, the parser is taken from `main` itself: `parse_args` is intercepted
on its first call, before anything runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the project's packages, installed or not
    sys.path.insert(0, str(ROOT))

MARKER = "<!-- cli-reference -->"
# The documented commands: how a user types them, and the module whose parser reads them.
COMMANDS = {
    "python -m study.run": "study.run",
    "python -m datasets.convert": "datasets.convert",
    "python -m analysis.report": "analysis.report",
    "python -m study.predict": "study.predict",
    "python -m study.tracking": "study.tracking.server",
    "python -m datasets.synthetic": "datasets.synthetic",
    "python -m datasets.synthetic_dicom": "datasets.synthetic_dicom",
}
# Defaults the parsers read from the environment: left out while they are built, so the page
# shows each command's own default, whatever the machine that builds the site has set.
ENVIRONMENT_DEFAULTS = ("MLFLOW_TRACKING_URI", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION")


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def parser_of_main(main: Callable) -> argparse.ArgumentParser:
    """The parser a `main(argv)` builds, taken at its first `parse_args` call (nothing else runs)."""
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        main(["--help"])
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise RuntimeError(f"{main.__module__}.main returned without parsing its arguments")


@contextlib.contextmanager
def _plain_environment() -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in (*ENVIRONMENT_DEFAULTS, "COLUMNS", "NO_COLOR")}
    for key in ENVIRONMENT_DEFAULTS:
        os.environ.pop(key, None)
    os.environ["COLUMNS"] = "82"  # argparse wraps help at COLUMNS - 2: the width of the page's code blocks
    os.environ["NO_COLOR"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def parser(module_name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(module_name)
    with _plain_environment():
        if hasattr(module, "build_parser"):
            return module.build_parser()
        return parser_of_main(module.main)


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Each documented command (as typed) -> its parser."""
    return {command: parser(module) for command, module in COMMANDS.items()}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's sub-commands by name (`study.tracking serve`), empty if it has none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(parser: argparse.ArgumentParser) -> str:
    with _plain_environment():
        text = parser.format_help()
    # A default made from the building machine's folder reads as the user's own.
    return text.replace(str(Path.cwd()), "$PWD").rstrip()


def _fence(text: str) -> str:
    return f"```text\n{text}\n```"


def reference() -> str:
    parts = []
    for command, module in COMMANDS.items():
        top = parser(module)
        subs = subparsers(top)
        parts.append(f"## `{command}`\n\n{_fence(_help(top))}")
        for name, sub in subs.items():
            parts.append(f"### `{command} {name}`\n\n{_fence(_help(sub))}")
    return "\n\n".join(parts) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, reference())
    return markdown
