"""Command-line conventions (`datasets.cli`): every command has --version, shows each default once
and as typed, carries no docstring markup, groups its flags, and the console scripts of
pyproject.toml are the commands."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

from datasets.cli import SCRIPTS, version
from tests.conftest import PROJECT_ROOT

COMMANDS = ["study.run", "datasets.convert", "analysis.report", "study.predict", "study.tracking",
            "datasets.synthetic", "datasets.synthetic_dicom"]


def _help(module: str) -> str:
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                            cwd=PROJECT_ROOT, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("module", COMMANDS)
def test_help_and_version(module):
    text = _help(module)
    assert "``" not in text and "(default: None)" not in text
    for line in text.splitlines():
        assert line.count("(default:") <= 1, line
    assert not re.search(r"default: \(\d+, \d+", text), "a tuple default shown as Python"
    assert "--version" in text
    result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120,
                            cwd=PROJECT_ROOT)
    assert result.returncode == 0 and result.stdout.strip().endswith(version()), result.stdout + result.stderr


def test_flags_are_grouped_by_job():
    text = _help("study.run")
    groups = re.findall(r"^([a-z][a-z ]+):$", text, re.MULTILINE)
    assert {"data and cells", "search", "resources", "tracking and storage"} <= set(groups), groups
    assert "--max-concurrent" in text and "every trial slot" in text
    assert "required (except with --verify):" in _help("datasets.convert")
    assert "required:" in _help("analysis.report")


def test_console_scripts_are_the_commands():
    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {name: target.split(":")[0] for name, target in scripts.items()} == {
        script: ("study.tracking.server" if module == "study.tracking" else module) for module, script in SCRIPTS.items()}
    import shutil

    installed = shutil.which("glioma-study", path=str(PROJECT_ROOT / ".venv" / "bin")) or shutil.which("glioma-study")
    if installed is None:
        pytest.skip("the project is not installed with its console scripts (pip install -e .)")
    result = subprocess.run([installed, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: glioma-study"), result.stdout[:200]


def test_mlflow_tracking_uri_is_honoured(monkeypatch, tmp_path):
    from study.config import resolve
    from study.run import build_parser

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    config = resolve(build_parser().parse_args(["--space", "smoke"]))
    assert config.tracking_uri == f"sqlite:///{tmp_path}/elsewhere.db"
    config = resolve(build_parser().parse_args(["--space", "smoke", "--tracking-uri", f"sqlite:///{tmp_path}/x.db"]))
    assert config.tracking_uri == f"sqlite:///{tmp_path}/x.db"
