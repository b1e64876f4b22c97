"""MkDocs hook: pages that show what the repository already says, read at build time so they
never drift from it.

- `<!-- benchmarks-results -->` (docs/benchmarks/index.md): every benchmarks/results/*.md, each
  under its own heading with the machine it ran on; their figures are added to the site beside the
  page. A results file without its `- machine:` line is a warning (a failure under --strict).
- `<!-- readme: TITLE -->`: the body of the README's section `## TITLE`, its links into docs/
  made relative to the page and its other repository links shown as paths. A missing section is a
  warning.
- `<!-- progress-lines -->`: the example of the study's live progress lines from
  study/progress.py's docstring (the module that prints them).
"""

from __future__ import annotations

import ast
import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
PROGRESS = ROOT / "study" / "progress.py"
BENCHMARKS_PAGE_DIR = "benchmarks"  # the results' figures go beside docs/benchmarks/index.md

log = logging.getLogger("mkdocs.hooks.includes")

README_MARKER = re.compile(r"<!-- readme: (.+?) -->")
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)([^)]*)\)")


def _outside_fences(lines: list[str]):
    """(index, line) of the lines that are not inside a fenced code block."""
    inside = False
    for index, line in enumerate(lines):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield index, line


def demote(text: str, levels: int = 1) -> str:
    lines = text.splitlines()
    for index, line in _outside_fences(lines):
        if re.match(r"#{1,5} ", line):
            lines[index] = "#" * levels + line
    return "\n".join(lines)


def benchmarks_results() -> str:
    parts = []
    for path in sorted(RESULTS.glob("*.md")):
        text = path.read_text().strip()
        if not re.search(r"^- machine: ", text, re.MULTILINE):
            log.warning(f"benchmarks/results/{path.name} does not say which machine it ran on ('- machine:' line)")
        title, _, body = text.partition("\n")
        if not title.startswith("# "):
            title, body = f"# {path.stem}", text
        parts.append(f"##{title}\n\n*`benchmarks/results/{path.name}`*\n\n{demote(body.strip(), 2)}")
    return "\n\n".join(parts) + "\n"


def readme_section(title: str) -> str | None:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    return match.group(1).strip() if match else None


def relink(text: str, page_src_uri: str) -> str:
    """README links (relative to the repository root) as seen from a page of the site."""
    page_dir = posixpath.dirname(page_src_uri)

    def replace(match: re.Match) -> str:
        bang, label, target, rest = match.groups()
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # an address: as it is
            return match.group(0)
        if target.startswith("#"):  # a heading of the README, which the page may not have
            return label
        if target.startswith("docs/"):
            return f"{bang}[{label}]({posixpath.relpath(target[len('docs/'):], page_dir or '.')}{rest})"
        return f"{label} (`{target}`)"  # a file of the repository, not of the site

    return LINK.sub(replace, text)


def progress_lines() -> str:
    docstring = ast.get_docstring(ast.parse(PROGRESS.read_text())) or ""
    match = re.search(r"::\n\n((?:[ \t]+.*\n?|\n)+)", docstring)
    if not match:
        log.warning("study/progress.py's docstring has no example of the progress lines (a '::' block)")
        return ""
    lines = match.group(1).rstrip().splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "```text\n" + "\n".join(line[indent:] for line in lines) + "\n```"


def on_files(files, config):
    for path in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"{BENCHMARKS_PAGE_DIR}/{path.name}", abs_src_path=str(path),
                                    inclusion=InclusionLevel.INCLUDED))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- benchmarks-results -->" in markdown:
        markdown = markdown.replace("<!-- benchmarks-results -->", benchmarks_results())
    if "<!-- progress-lines -->" in markdown:
        markdown = markdown.replace("<!-- progress-lines -->", progress_lines())

    def section(match: re.Match) -> str:
        body = readme_section(match.group(1))
        if body is None:
            log.warning(f"{page.file.src_uri}: the README has no section '## {match.group(1)}'")
            return ""
        return relink(body, page.file.src_uri)

    return README_MARKER.sub(section, markdown)
