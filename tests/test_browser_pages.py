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

STUDY = "browser"
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
    assert main(["--space", "smoke", "--data", str(small_store), "--tasks", "os_all", "1yr_all", "--num-samples", "2",
                 "--backbones", "seresnext50", "densenet121", "--tracking-uri", uri, "--storage-path", str(root / "rr"),
                 "--name", STUDY]) == 0
    index = build_report(STUDY, uri, root / "report", external=[small_store], gradcam_patients=1)
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


def _printed_pages(uri: str, mlflow_ui: str) -> dict[str, str]:
    """The addresses the study prints (its hint), on the test's UI server."""
    from mlflow.tracking import MlflowClient

    from study.config import StudyConfig
    from study.driver import mlflow_ui_hint

    experiment = MlflowClient(uri).get_experiment_by_name(STUDY)
    hint = mlflow_ui_hint(StudyConfig(space="smoke", budget="demo", data=None, external=(), backbones=(), tasks=(),
                                      num_samples=1, max_concurrent=1, cpus_per_trial=1, gpus_per_trial=0,
                                      address=None, tracking_uri=uri, storage_path="rr", name=STUDY),
                          experiment.experiment_id)
    lines = {line.split(": ")[0].strip(): line.split(": ", 1)[1].split()[0] for line in hint.splitlines()[1:]}
    pages = {"cells": next(v for k, v in lines.items() if k.startswith("the cells side by side")),
             "chart": next(v for k, v in lines.items() if k.startswith("the same cells")),
             "runs": next(v for k, v in lines.items() if k.startswith("the study run"))}
    return {k: v.replace("http://127.0.0.1:5000", mlflow_ui) for k, v in pages.items()}


def _uncluttered(page) -> None:
    """Close the MLflow assistant and fold the sidebar, which take a third of the frame."""
    page.get_by_text("Training runs").first.wait_for(timeout=60_000)
    close = page.locator("button[aria-label='Close']")
    if close.count():
        close.first.click()
    page.locator("button[aria-label='Toggle sidebar']").first.click()


def test_the_cells_are_compared_side_by_side_sorted_by_their_headline(study, mlflow_ui, browser, tmp_path):
    from mlflow.tracking import MlflowClient

    from evaluation import metric_names as names

    _, uri, _ = study
    page = browser.new_page(viewport={"width": 1400, "height": 640})
    page.goto(_printed_pages(uri, mlflow_ui)["cells"])
    _uncluttered(page)
    page.get_by_text("seresnext50/os_all", exact=True).first.wait_for(timeout=60_000)
    # The headline and its interval as columns (the Columns menu, as a user adds them); the others go.
    page.get_by_role("button", name="Columns", exact=True).click()
    for column in ("Dataset", "Source", "Models"):
        page.get_by_text(column, exact=True).last.click()
    for metric in (names.BBC_CINDEX, names.BBC_CINDEX_LOW, names.BBC_CINDEX_HIGH, names.OOF_CINDEX, names.BRIER_365):
        page.get_by_text(metric.name, exact=True).last.click()
    page.keyboard.press("Escape")
    header = page.get_by_test_id(f"sort-header-{names.BBC_CINDEX.name}")
    header.wait_for(timeout=30_000)
    client = MlflowClient(uri)
    cells = client.search_runs([client.get_experiment_by_name(STUDY).experiment_id], "tags.study_role = 'cell'")
    expected = [r.info.run_name for r in sorted(cells, key=lambda r: -r.data.metrics[names.BBC_CINDEX.name])]

    def listed() -> list[str]:
        """The cells in the order the table shows them (its rows' aria-rowindex, not the DOM's order)."""
        rows = page.evaluate("Array.from(document.querySelectorAll('[role=row][aria-rowindex]'))"
                             ".map(r => [parseInt(r.getAttribute('aria-rowindex')), r.innerText])")
        return [next(n for n in expected if n in text.split()) for _, text in sorted(rows)
                if any(n in text.split() for n in expected)]

    assert listed() == expected, "every cell, best headline first"
    header.click()  # the column sorts: ascending now
    page.get_by_role("button", name=f"Sort: {names.BBC_CINDEX.name}").wait_for(timeout=30_000)
    for _ in range(100):
        if listed() == expected[::-1]:
            break
        page.wait_for_timeout(200)
    assert listed() == expected[::-1]
    header.click()  # best first again, as the picture shows it
    for _ in range(100):
        if listed() == expected:
            break
        page.wait_for_timeout(200)
    page.wait_for_timeout(1500)  # the table fades back in after a sort: no half-grey picture
    _screenshot(page, tmp_path, "mlflow_cells_table.png")
    page.close()


def test_the_chart_view_compares_the_headline_across_cells_in_one_chart(study, mlflow_ui, browser, tmp_path):
    from mlflow.tracking import MlflowClient

    from evaluation import metric_names as names

    _, uri, _ = study
    client = MlflowClient(uri)
    cells = client.search_runs([client.get_experiment_by_name(STUDY).experiment_id], "tags.study_role = 'cell'")
    page = browser.new_page(viewport={"width": 1400, "height": 720})
    page.goto(_printed_pages(uri, mlflow_ui)["chart"])
    _uncluttered(page)
    # One bar chart of the headline: a bar for every cell, labelled with its value.
    card = page.locator("[data-testid=experiment-view-compare-runs-card]",
                        has=page.get_by_text(names.BBC_CINDEX.name, exact=True)).first
    card.locator("g.point path").nth(len(cells) - 1).wait_for(timeout=60_000)
    assert card.locator("g.point path").count() == len(cells)
    labels = sorted(float(t) for t in card.locator("text.bartext").evaluate_all("els => els.map(e => e.textContent)"))
    assert labels == sorted(round(r.data.metrics[names.BBC_CINDEX.name], 2) for r in cells)
    _screenshot(page, tmp_path, "mlflow_cells_chart.png")
    page.close()


def test_the_comparison_figure_opens_from_the_study_runs_artifacts(study, mlflow_ui, browser, tmp_path):
    from mlflow.tracking import MlflowClient

    _, uri, _ = study
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(STUDY)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.study_role = 'study'")
    page = browser.new_page(viewport={"width": 1300, "height": 820})
    page.goto(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}/artifacts")
    page.get_by_text("cell_comparison.png").first.click()
    page.wait_for_function("Array.from(document.images).some(i => i.complete && i.naturalWidth > 600)", timeout=60_000)
    close = page.locator("button[aria-label='Close']")
    if close.count():
        close.first.click()
    _screenshot(page, tmp_path, "mlflow_comparison_figure.png")
    page.close()


def test_the_study_run_holds_its_cells_and_their_trials(study, mlflow_ui, browser, tmp_path):
    from mlflow.tracking import MlflowClient

    _, uri, _ = study
    page = browser.new_page(viewport={"width": 1400, "height": 800})
    page.goto(_printed_pages(uri, mlflow_ui)["runs"])
    _uncluttered(page)
    study_row = page.locator("[role=row]", has_text=STUDY).first
    study_row.wait_for(timeout=60_000)
    study_row.get_by_role("button").first.click()  # the + beside the study run: its cells
    cell_row = page.locator("[role=row]", has_text="seresnext50/os_all").first
    cell_row.wait_for(timeout=30_000)
    cell_row.get_by_role("button").first.click()  # the + beside a cell: its trials
    page.get_by_text("seresnext50/os_all/", exact=False).first.wait_for(timeout=30_000)
    names = " ".join(page.locator("[role=row]").all_inner_texts())
    experiment = MlflowClient(uri).get_experiment_by_name(STUDY)
    runs = MlflowClient(uri).search_runs([experiment.experiment_id], "tags.study_role = 'trial' and tags.task = 'os_all' "
                                                                     "and tags.backbone = 'seresnext50'")
    assert len(runs) == 2
    for run in runs:  # a pruned one says so at the start of its name, which the table shows
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


def test_a_new_patients_page_shows_its_numbers_curve_map_and_images(study, small_export, browser, tmp_path):
    """`study.predict` by --study and --cell on a PACS's DICOM export without outcomes: the DPIs are the
    fold ensemble's in the report's external validation of the same patients (the NIfTI files converted
    with the development store's preprocessing; the report scores them out of fold in its `dpi` column,
    as they are development patients), and each patient's page renders its figures."""
    import pandas as pd

    from datasets.synthetic_dicom import write_patient
    from study.predict import main as predict

    root, uri, index = study
    new = tmp_path / "new"  # the images only, as DICOM series named for nothing: no clinical table, no outcome
    for folder in sorted(p for p in (small_export / "images").iterdir() if p.is_dir()):
        write_patient(folder, new / folder.name, "flat", patient_id=folder.name)
    cell = "densenet121__os_all"
    assert predict(["--study", STUDY, "--cell", cell, "--tracking-uri", uri, "--images", str(new),
                    "--out", str(tmp_path / "scored")]) == 0
    scored = pd.read_csv(tmp_path / "scored" / "predictions.csv", dtype={"patient_id": str})
    report = pd.read_csv(index.parent / f"external_{cell}_small.csv", dtype={"patient_id": str}).set_index("patient_id")
    assert set(scored["patient_id"]) == set(report.index)
    assert scored["dpi"].to_numpy() == pytest.approx(report.loc[scored["patient_id"], "dpi_fold_ensemble"].to_numpy(),
                                                     rel=1e-5, abs=1e-5)
    assert set(scored["risk_group"]) <= {"high", "low"}
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.goto((tmp_path / "scored" / "index.html").absolute().as_uri())
    assert page.locator("table tr").count() == len(scored) + 1
    page.locator("table a").first.click()
    page.wait_for_load_state("load")
    page.evaluate("Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))")
    headings = page.locator("h2").all_inner_texts()
    assert {"Survival curve", "Grad-CAM", "Preprocessed images"} <= set(headings), headings
    assert page.locator("img").count() == 3 and _broken_images(page) == []
    first = scored.iloc[0]
    assert f"{first['dpi']:+.3f}" in page.locator("table").first.inner_text()
    _screenshot(page, tmp_path, "predict_page.png")
    page.close()
