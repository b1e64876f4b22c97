"""The pages a user opens, checked in a real browser (Debian's chromium driven by Playwright): the
MLflow UI's runs page as the study prints it, the report and the cohort store's QC page.

Skipped where chromium is not installed (``.ci/run`` installs it with apt). With
``README_SCREENSHOTS=DIR`` the screenshots are also written to DIR (the README's images).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from tests.services import free_port

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if CHROMIUM is None:
    pytest.skip("no chromium: apt-get install chromium (as .ci/run does)", allow_module_level=True)


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=False)
    if os.environ.get("README_SCREENSHOTS"):
        target = Path(os.environ["README_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def study(small_store, tmp_path_factory):
    """A small tracked study with finished and pruned trials, and its report."""
    from analysis.report import build_report
    from study.run import main

    root = tmp_path_factory.mktemp("browser")
    uri = f"sqlite:///{root}/mlflow.db"
    assert main(["--space", "smoke", "--data", str(small_store), "--tasks", "os_all", "--backbones", "seresnext50",
                 "densenet121", "--num-samples", "3", "--tracking-uri", uri, "--storage-path", str(root / "rr"),
                 "--name", "browser"]) == 0
    index = build_report("browser", uri, root / "report", external=[small_store], gradcam_patients=1)
    return root, uri, index


@pytest.fixture(scope="module")
def mlflow_ui(study):
    import requests

    root, uri, _ = study
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                                "--port", str(port)], cwd=PROJECT_ROOT, stdout=open(root / "ui.log", "w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline and process.poll() is None, (root / "ui.log").read_text()[-2000:]
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, 9)
        process.wait()


def _broken_images(page) -> list[str]:
    return page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")


def test_the_printed_runs_page_shows_the_study_run_with_its_trials_nested(study, mlflow_ui, browser, tmp_path,
                                                                           capsys):
    from mlflow.tracking import MlflowClient

    from study.config import StudyConfig
    from study.driver import mlflow_ui_hint

    _, uri, _ = study
    experiment = MlflowClient(uri).get_experiment_by_name("browser")
    hint = mlflow_ui_hint(StudyConfig(space="smoke", budget="demo", data=None, external=(), backbones=(), tasks=(),
                                      num_samples=1, max_concurrent=1, cpus_per_trial=1, gpus_per_trial=0,
                                      address=None, tracking_uri=uri, storage_path="rr", name="browser"),
                          experiment.experiment_id)
    url = hint.split("then the study's runs: ")[1].split()[0].replace("http://127.0.0.1:5000", mlflow_ui)
    page = browser.new_page(viewport={"width": 1400, "height": 800})
    page.goto(url)
    study_row = page.locator("[role=row]", has_text="browser").first
    study_row.wait_for(timeout=60_000)
    # The + beside the study run's name shows its trial runs.
    study_row.get_by_role("button").first.click()
    page.get_by_text("seresnext50/os_all/", exact=False).first.wait_for(timeout=30_000)
    names = " ".join(page.locator("[role=row]").all_inner_texts())
    assert "densenet121/os_all/" in names
    runs = MlflowClient(uri).search_runs([experiment.experiment_id], "tags.study_role = 'trial'")
    assert len(runs) == 6
    for run in runs:  # every trial is listed; a pruned one says so at the start of its name, which the table shows
        assert run.info.run_name.split()[0] in names
    _screenshot(page, tmp_path, "mlflow_runs.png")
    page.close()


def test_the_report_page_renders_every_figure(study, browser, tmp_path):
    _, _, index = study
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.goto(index.absolute().as_uri())
    page.wait_for_load_state("load")
    headings = page.locator("h2").all_inner_texts()
    assert any("External validation" in h for h in headings), headings
    assert page.locator("img").count() >= 3
    page.evaluate("Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))")
    assert _broken_images(page) == []
    _screenshot(page, tmp_path, "report.png")
    page.close()


def test_the_qc_page_shows_every_patients_montage(small_store, browser, tmp_path):
    from datasets import CohortStore

    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.goto((small_store / "qc" / "index.html").absolute().as_uri())
    page.wait_for_load_state("load")
    page.evaluate("Promise.all(Array.from(document.images).map(i => { i.loading = 'eager'; return i.decode()"
                  ".catch(() => null) }))")
    usable = len(CohortStore(small_store).usable())
    assert page.locator("h3").count() == usable
    assert page.locator("img").count() == usable and _broken_images(page) == []
    _screenshot(page, tmp_path, "qc.png")
    page.close()
