"""The documentation site (mkdocs.yml, docs/): it builds strictly, every command it and the README
show is one the command's own parser accepts, and a newcomer can read it in a browser.

- The site builds with ``mkdocs build --strict``: a broken link or anchor, a missing page or image,
  a README section a page includes that no longer exists, or a benchmark result without its machine
  fails it.
- Every ``python -m study.run | datasets.convert | analysis.report | study.tracking`` line in the
  README and in docs/ (shell code blocks with their ``\\`` continuations joined, and inline code that
  starts with the command) is parsed by that command's parser (the one the CLI reference renders,
  ``docs/hooks/cli_reference.py``): a flag that does not exist fails, placeholders (``BUCKET``,
  ``$BUCKET``, ``N``) are fine as values, ``[--optional ...]`` brackets are read as plain flags.
- In Chromium (Debian's, driven by Playwright; skipped where it is absent): the built site's
  index.html, every page of its navigation with a title and every image loaded, its links to other
  pages of the site, and every link of the README into docs/.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs"
README = PROJECT_ROOT / "README.md"
CHROMIUM = Path("/usr/bin/chromium")
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_-]*|.*\$.*|.*\.\.\..*)$")  # BUCKET, JOB_ID, N, $BUCKET/x, postgresql://...
OPERATORS = set("();<>|&")


def _cli_reference():
    """docs/hooks/cli_reference.py, the hook that renders the parsers into the site."""
    spec = importlib.util.spec_from_file_location("docs_hooks_cli_reference", DOCS / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the commands the docs show -----------------------------------------------------------------

# The documented commands, as the command-line reference lists them (longest first: a name that
# begins another, datasets.synthetic and datasets.synthetic_dicom, is matched whole).
COMMAND = re.compile(r"\bpython -m (" + "|".join(
    re.escape(c[len("python -m "):]) for c in sorted(_cli_reference().COMMANDS, key=len, reverse=True)) + r")(?![\w.])")


@dataclass
class Shown:
    where: str  # FILE:LINE
    command: str  # "python -m study.run"
    text: str  # what follows the command on its (joined) line


def _documents() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def shown_commands(path: Path) -> list[Shown]:
    """The documented command lines of a Markdown file: in fenced code blocks (not Python ones), with
    continuation lines joined and comments dropped, and in inline code that starts with a command."""
    name = path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path
    lines = path.read_text().splitlines()
    found: list[Shown] = []
    prose: list[tuple[int, str]] = []
    fence, language, block = None, "", []  # block: (line number, text)

    def take(number: int, line: str) -> None:
        line = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment (a '#' inside a word, as in a URL, stays)
        for match in COMMAND.finditer(line):
            found.append(Shown(f"{name}:{number}", f"python -m {match.group(1)}", line[match.end():]))

    for number, line in enumerate(lines, 1):
        opening = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
        if fence is None and opening:
            fence, language, block = opening.group(1), opening.group(2).lower(), []
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                if language not in ("python", "py", "pycon"):
                    joined, start = "", None
                    for at, text in block:
                        start = at if start is None else start
                        if text.rstrip().endswith("\\"):
                            joined += text.rstrip()[:-1] + " "
                            continue
                        take(start, joined + text)
                        joined, start = "", None
                    if joined:
                        take(start, joined)
                fence = None
            else:
                block.append((number, line))
            continue
        prose.append((number, line))
    text = "\n".join(line for _, line in prose)
    starts = [number for number, _ in prose]
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        span = " ".join(match.group(1).split())
        command = COMMAND.match(span)
        if command:
            number = starts[text.count("\n", 0, match.start())]
            found.append(Shown(f"{name}:{number}", f"python -m {command.group(1)}", span[command.end():]))
    return sorted(found, key=lambda shown: int(shown.where.rsplit(":", 1)[1]))


def words(text: str) -> list[str]:
    """A command's arguments as the shell splits them, up to the first operator (&&, |, ;, >),
    with the [ ] of optional arguments and '...' left out."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out = []
    try:
        tokens = list(lexer)
    except ValueError as exc:  # an unclosed quote
        raise ValueError(f"cannot split {text!r}: {exc}") from exc
    for token in tokens:
        if set(token) <= OPERATORS:
            break
        token = token.lstrip("[").rstrip("]")
        if token and token != "...":
            out.append(token)
    return out


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return parser._option_string_actions


def check(shown: Shown, parsers: dict[str, argparse.ArgumentParser], subparsers) -> str | None:
    """Why the shown command line is not one its parser accepts (None: it is)."""
    try:
        arguments = words(shown.text)
    except ValueError as exc:
        return str(exc)
    parser = parsers[shown.command]
    subs = subparsers(parser)
    if subs and arguments and arguments[0] in subs:
        known = {**options(parser), **options(subs[arguments[0]])}
        known_for = {i: options(subs[arguments[0]]) for i in range(1, len(arguments))}
    elif subs and arguments:
        return f"{arguments[0]!r} is not a sub-command of {shown.command} (one of {sorted(subs)})"
    else:
        known, known_for = options(parser), {}
    unknown = [a.split("=", 1)[0] for a in arguments
               if re.match(r"^--?[A-Za-z]", a) and a.split("=", 1)[0] not in known]
    if unknown:
        return f"no such flag: {', '.join(unknown)}"
    if not arguments or {"-h", "--help"} & set(arguments):
        return None  # the command named in prose, or its help
    # A placeholder stands for a value of the flag's type.
    values, action = [], None
    for index, argument in enumerate(arguments):
        if re.match(r"^--?[A-Za-z]", argument):
            action = known_for.get(index, known).get(argument.split("=", 1)[0])
        elif action is not None and PLACEHOLDER.match(argument):
            if action.choices:
                argument = str(next(iter(action.choices)))
            elif action.type in (int, float):
                argument = "1"
        values.append(argument)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(values)
    except SystemExit as exc:
        if exc.code:
            return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {exc.code}"
    return None


def test_every_command_the_docs_show_exists():
    reference = _cli_reference()
    parsers = reference.parsers()
    shown = [s for path in _documents() for s in shown_commands(path)]
    assert {s.command for s in shown} == set(reference.COMMANDS), "each documented command is shown somewhere"
    assert len(shown) >= 30, [s.where for s in shown]
    problems = [f"{s.where}: {s.command}{s.text}\n    -> {why}" for s in shown
                if (why := check(s, parsers, reference.subparsers))]
    assert not problems, "commands the docs show that their parsers refuse:\n" + "\n".join(problems)


def test_the_command_check_finds_a_flag_that_does_not_exist(tmp_path):
    """The check above, on a document with a wrong flag, a placeholder and a continuation."""
    reference = _cli_reference()
    parsers = reference.parsers()
    page = tmp_path / "page.md"
    page.write_text("Run `python -m analysis.report --study S --no-such-flag`.\n\n"
                    "```bash\n"
                    "ray job submit -- \\\n"
                    "    python -m study.run --data s3://$BUCKET/cohort.zarr \\\n"
                    "    --max-concurrent N --budget BUDGET  # a comment --not-a-flag\n"
                    "python -m datasets.convert --images EXPORT [--workers N] [--column a=b ...] && echo --nope\n"
                    "python -m study.tracking serve --port 5000 --root DIR\n"
                    "python -m study.tracking serve --study x\n"
                    "```\n")
    shown = shown_commands(page)
    assert [s.where for s in shown] == [f"{page}:{n}" for n in (1, 4, 7, 8, 9)]
    verdicts = {" ".join(s.text.split()): check(s, parsers, reference.subparsers) for s in shown}
    assert verdicts == {
        "--study S --no-such-flag": "no such flag: --no-such-flag",
        "--data s3://$BUCKET/cohort.zarr --max-concurrent N --budget BUDGET": None,
        "--images EXPORT [--workers N] [--column a=b ...] && echo --nope": None,
        "serve --port 5000 --root DIR": None,
        "serve --study x": "no such flag: --study",
    }, verdicts


# --- the site -----------------------------------------------------------------------------------


def _build(site_dir: Path, strict: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", *(["--strict"] if strict else []),
                           "--site-dir", str(site_dir)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


@pytest.fixture(scope="module")
def strict_build(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    return site, _build(site, strict=True)


@pytest.fixture(scope="module")
def site(strict_build, tmp_path_factory):
    """The built site; built without --strict if the strict build failed, so that the browser still
    shows what a reader would see (the strict test reports the warnings)."""
    site, result = strict_build
    if result.returncode != 0:
        site = tmp_path_factory.mktemp("site-lenient")
        result = _build(site, strict=False)
        assert result.returncode == 0, result.stderr[-3000:]
    return site


@pytest.mark.slow
def test_the_site_builds_strictly(strict_build):
    _, result = strict_build
    warnings = [line for line in result.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0 and not warnings, "mkdocs build --strict:\n" + "\n".join(
        warnings or result.stderr.splitlines()[-20:])


def _nav_pages() -> list[str]:
    """The pages of mkdocs.yml's nav, as the built site's .html paths."""
    config = yaml.safe_load((PROJECT_ROOT / "mkdocs.yml").read_text())
    pages = []

    def walk(item):
        if isinstance(item, str):
            pages.append(re.sub(r"\.md$", ".html", item))
        elif isinstance(item, list):
            for entry in item:
                walk(entry)
        elif isinstance(item, dict):
            for entry in item.values():
                walk(entry)

    walk(config["nav"])
    return pages


def _readme_links() -> list[str]:
    text = README.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)", text)
    targets += re.findall(r"<(?:img|a)\b[^>]*?(?:src|href)=\"([^\"]+)\"", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


IMAGES_LOADED = """() => Promise.all(Array.from(document.images).map(i => { i.loading = 'eager';
    return i.decode().then(() => [i.getAttribute('src'), i.naturalWidth]).catch(() => [i.getAttribute('src'), 0]); }))"""


@pytest.mark.slow
def test_a_newcomer_reads_the_site_and_follows_the_readmes_links_in_chromium(site):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not CHROMIUM.exists():
        pytest.skip("no chromium: apt-get install chromium (as .ci/run does)")
    problems = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((site / "index.html").as_uri())
        page.wait_for_load_state("load")
        nav = page.eval_on_selector_all("nav.md-nav--primary a.md-nav__link[href]", "els => els.map(e => e.href)")
        nav = list(dict.fromkeys(href.split("#")[0] for href in nav if href.startswith("file:")))
        listed = {Path(href[len("file://"):]).relative_to(site).as_posix() for href in nav}
        missing = set(_nav_pages()) - listed
        assert not missing, f"pages of mkdocs.yml's nav that the site's navigation does not link: {missing}"
        for href in nav:
            name = Path(href[len("file://"):]).relative_to(site).as_posix()
            try:
                page.goto(href)
                page.wait_for_load_state("load")
            except sync_api.Error as exc:
                problems.append(f"{name}: does not open ({exc})")
                continue
            title = page.title().strip()
            heading = page.locator("article h1").first
            if not title or not heading.count() or not heading.inner_text().strip():
                problems.append(f"{name}: no title or heading (title {title!r})")
            for src, width in page.evaluate(IMAGES_LOADED):
                if not width:
                    problems.append(f"{name}: image {src} does not load")
            for link in page.eval_on_selector_all("article a[href]", "els => els.map(e => e.href)"):
                target = link.split("#")[0]
                if target.startswith("file:") and not Path(target[len("file://"):]).exists():
                    problems.append(f"{name}: link to {link}, which is not in the site")
        for target in _readme_links():
            path = (PROJECT_ROOT / target.split("#")[0]).resolve()
            if not path.is_relative_to(DOCS):
                continue
            where = f"README link {target}"
            if not path.exists():
                problems.append(f"{where}: {path.relative_to(PROJECT_ROOT)} does not exist")
                continue
            if path.suffix == ".md":  # a page of the site: it was built and opens with a title
                path = site / path.relative_to(DOCS).with_suffix(".html")
                if not path.exists():
                    problems.append(f"{where}: the site has no {path.relative_to(site)}")
                    continue
            try:
                page.goto(path.as_uri())
                page.wait_for_load_state("load")
            except sync_api.Error as exc:
                problems.append(f"{where}: does not open in chromium ({exc})")
                continue
            if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"):
                if not all(width for _, width in page.evaluate(IMAGES_LOADED)):
                    problems.append(f"{where}: the image does not load")
            elif not page.title().strip():
                problems.append(f"{where}: the page has no title")
        browser.close()
    assert not problems, "\n".join(problems)


def test_the_readmes_first_screen_shows_the_answer():
    """A newcomer reads the first screen: what the tool answers, and a picture of that answer (the
    demo's headline C-index per cell against what there was to learn) before any command; the README
    stays short enough to read in five minutes."""
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"the README has {len(lines)} lines"
    first_image = next(n for n, line in enumerate(lines) if re.match(r"!\[[^\]]+\]\(([^)]+)\)", line))
    first_command = next(n for n, line in enumerate(lines) if line.startswith("```"))
    assert first_image < first_command and first_image < 30, (first_image, first_command)
    target = re.match(r"!\[[^\]]+\]\(([^)\s]+)", lines[first_image]).group(1)
    assert (PROJECT_ROOT / target).is_file() and target.endswith("demo_cell_comparison.png"), target
