"""The house's layout (docs/architecture.md): each package imports only the packages below it, and
the comments that cite a document cite one that exists."""

from __future__ import annotations

import ast
import re

import pytest

from tests.conftest import PROJECT_ROOT

# Bottom to top, as docs/architecture.md's table lists them.
FLOORS = ("datasets", "search_spaces", "evaluation", "trainables", "analysis", "study")
# Packages on one floor's level that must not import each other either.
SIBLINGS = {("search_spaces", "evaluation")}


def _imports(path) -> set[str]:
    """Top-level project packages a module imports (at module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(FLOORS)


@pytest.mark.parametrize("package", FLOORS)
def test_a_package_imports_only_packages_below_it(package):
    above = set(FLOORS[FLOORS.index(package) + 1:]) | {b for a, b in SIBLINGS if a == package} \
        | {a for a, b in SIBLINGS if b == package}
    wrong = {str(path.relative_to(PROJECT_ROOT)): sorted(_imports(path) & above)
             for path in (PROJECT_ROOT / package).rglob("*.py") if _imports(path) & above}
    assert not wrong, f"imports of packages above {package} (docs/architecture.md): {wrong}"


def test_the_documented_layers_are_the_project_packages():
    table = (PROJECT_ROOT / "docs" / "architecture.md").read_text()
    listed = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)
    assert tuple(listed) == FLOORS


def test_comments_cite_documents_that_exist():
    missing = []
    for package in (*FLOORS, "benchmarks"):
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            text = path.read_text()
            if "ARCHITECTURE decision" in text:
                missing.append(f"{path.name}: ARCHITECTURE decision (the sketch is docs/architecture.md)")
            for cited in re.findall(r"\b(docs/[\w./-]+\.md)\b", text):
                if not (PROJECT_ROOT / cited).is_file():
                    missing.append(f"{path.relative_to(PROJECT_ROOT)}: {cited}")
    assert not missing, missing


# Contracts spelt once (evaluation.metric_names, datasets.remote, datasets.clinical_features): literals that must not come back
# in the packages' code, with where they live instead.
SPELT_ONCE = {r"[\"']study_role[\"']|tags\.study_role": "evaluation.metric_names.ROLE_TAG / role_filter",
              r"[\"']cell_key[\"']|[\"']trial_key[\"']": "evaluation.metric_names.CELL_KEY_TAG / TRIAL_KEY_TAG",
              r"[\"']study_config\.json[\"']": "evaluation.metric_names.CONFIG_FILE",
              r"[\"']://[\"'] (not )?in\b": "datasets.remote.is_remote",
              r"EXPERIMENT = [\"']trials[\"']": "evaluation.metric_names.EXPERIMENT",
              r"get\(names\.(FINAL|FAILED)\)": "evaluation.metric_names.outcome (how a trial ended)",
              r"[\"']image\+clinical[\"']": "datasets.clinical_features.IMAGE_CLINICAL",
              r"[\"']oof_predictions\.csv[\"']": "evaluation.metric_names.OOF_FILE",
              r"[\"']meta\.json[\"']": "evaluation.metric_names.MODEL_META_FILE",
              r"[\"']outcome[\"']": "evaluation.metric_names.OUTCOME_TAG",
              r"inputs.{0,30}[\"']image[\"']|[\"']image[\"'].{0,30}inputs": "datasets.clinical_features.IMAGE"}


@pytest.mark.parametrize("pattern", SPELT_ONCE)
def test_a_contract_is_spelt_once(pattern):
    home = {"evaluation/metric_names.py", "datasets/remote.py", "datasets/clinical_features.py"}
    found = [f"{path.relative_to(PROJECT_ROOT)}:{n}" for package in FLOORS
             for path in (PROJECT_ROOT / package).rglob("*.py") if str(path.relative_to(PROJECT_ROOT)) not in home
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(pattern, line) and not line.lstrip().startswith("#")]
    assert not found, f"use {SPELT_ONCE[pattern]}: {found}"


# The modules that talk to MLflow: the one reader of a study's records and the one writer, and two
# writes that must bypass the writer's journal (it lives on the storage path, which is not trusted).
MLFLOW_CLIENTS = {
    "analysis/study_reader.py": "the one reader (and the copy of finished folders, attach_folder)",
    "study/tracking/tracker.py": "the one writer (journalled)",
    "study/resume_trust.py": "the digests of Tune's state files, which vouch for the storage path",
    "study/model_logging.py": "the model registry (versions, descriptions)",
}


def test_a_studys_records_have_one_reader_and_one_writer():
    pattern = re.compile(r"MlflowClient|mlflow\.(tracking|search_|log_|set_tag|start_run|register_model|get_run)")
    found = sorted({str(path.relative_to(PROJECT_ROOT)) for package in FLOORS
                    for path in (PROJECT_ROOT / package).rglob("*.py") if pattern.search(path.read_text())})
    assert found == sorted(MLFLOW_CLIENTS), found


def test_how_a_trial_ended_is_decided_in_one_place():
    from evaluation import metric_names as names

    assert names.outcome({names.FINAL: True, "epoch": 20}) == names.FINISHED
    assert names.outcome({"epoch": 6}) == names.PRUNED and names.outcome(None) == names.PRUNED
    assert names.outcome({names.FAILED: "diverged"}) == names.FAILED_OUTCOME
    assert names.outcome({names.FINAL: True}, errored=True) == names.FAILED_OUTCOME


def test_the_best_configuration_is_chosen_by_one_criterion_whatever_the_order(monkeypatch):
    from analysis.study_reader import Study, Trial
    from evaluation import metric_names as names

    def c(value):
        return {names.OOF_CINDEX.name: value}

    assert names.ranks_above(c(0.70), "b", c(0.60), "a") and not names.ranks_above(c(0.60), "a", c(0.70), "b")
    assert names.ranks_above(c(0.70), "a", c(0.70), "b") and not names.ranks_above(c(0.70), "b", c(0.70), "a")  # tie
    assert names.ranks_above(c(0.51), "z", c(float("nan")), "a") and not names.ranks_above({}, "a", c(0.51), "z")
    # The criterion is named once: renamed there, the report's choice follows it.
    trials = [Trial(str(k), "densenet121", "os_all", f"t{k}", "FINISHED", {},
                    {names.OOF_CINDEX.name: oof, names.UNO_C.name: uno}) for k, (oof, uno) in enumerate(
                        [(0.70, 0.60), (0.65, 0.68), (0.60, 0.62)])]
    study = Study("s", "", "", {}, trials)
    assert [t.trial_id for t in study.best_per_cell().values()] == ["t0"]
    monkeypatch.setattr(names, "SELECTED_BY", names.UNO_C)
    assert [t.trial_id for t in study.best_per_cell().values()] == ["t1"]


def test_no_function_of_the_packages_is_over_60_lines():
    """A function longer than a screen does several jobs (issue 31); benchmarks and tests are exempt."""
    import ast

    long = []
    for package in FLOORS:
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                    long.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {node.name} "
                                f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_an_import_inside_a_function_is_one_that_costs_time():
    """Imports inside functions keep a command's start fast (torch, Ray, MLflow load in seconds); a
    standard-library module costs nothing and belongs at the top, where a reader looks (issue 31)."""
    import ast
    import sys

    found = []
    for package in FLOORS:
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for inner in ast.walk(node):
                        module = inner.module if isinstance(inner, ast.ImportFrom) else (
                            inner.names[0].name if isinstance(inner, ast.Import) else None)
                        if module and module.split(".")[0] in sys.stdlib_module_names:
                            found.append(f"{path.relative_to(PROJECT_ROOT)}:{inner.lineno} {module}")
    assert not found, found
