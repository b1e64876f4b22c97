"""The report's sections (`analysis.report` runs them): leaderboard, external validation of the fold
ensembles, added prognostic value, Kaplan-Meier curves, Grad-CAM with its attention score, and
search diagnostics. Each section computes its numbers, writes its CSVs and PNGs into the report
folder and appends its part of the page."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures
from evaluation import metric_names as names
from analysis.added_value import CLINICAL, Design, Models, added_value_row, external_added_value
from trainables.ensemble import DevelopmentScale, development_scale, load_fold_models, predict_ensemble
from analysis.inputs_comparison import CLINICAL_MODEL, clinical_oof, compare, ensemble_predict
from analysis.gradcam import attention_in_region, gradcam_map, overlay, save_nifti, untrained_twin
from evaluation.metrics import SurvivalDataError, harrell_c
from evaluation.prediction_metrics import Predictions, metric_columns, score_predictions
from analysis.oracle import FALLBACK_NOTE, oracle_cindices, oracle_text
from evaluation.selection import bbc_cv
from analysis.study_reader import Study, Trial, logged_model_meta, oof_predictions
from datasets.clinical_features import FUSION_DEFAULT, IMAGE, IMAGE_CLINICAL
from datasets.cohort import Cohort, CohortSpec
from datasets.errors import StudyError
from datasets.file_names import safe_name
from datasets.remote import stage_store
from datasets.store import CohortStore
from search_spaces import TASKS, Cell
from trainables.config import TrainConfig
from trainables.fold_model import FoldModel

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.3g}"


def _fmt(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and np.isfinite(value) else ""


def searched_parameters(study: Study) -> list[str]:
    """The parameters the study searched, in its space's order (`searched_distributions`)."""
    return list(searched_distributions(study))


def searched_distributions(study: Study) -> dict:
    """The parameters the study searched -> their distributions (`search_spaces` LogUniform, Uniform,
    Choice), in its space's order: a built-in space by name, a space file from the file the study
    recorded, or, where that file is no longer readable (the report made elsewhere), the
    parameters whose values differ between the study's trials, with None for an unknown distribution."""
    from search_spaces import SPACES
    from search_spaces._space import OWNED_KEYS
    from search_spaces.from_file import SearchSpaceError, load_space

    budget = study.config.get("budget", "full")
    space = SPACES.get(study.config.get("space", ""))
    if space is None and study.config.get("space_file"):
        try:
            space = load_space(study.config["space_file"])
        except SearchSpaceError:
            space = None
    if space is not None:
        return dict(space.distributions_for(budget))
    varying: dict = {}
    for trial in study.trials:
        for key in trial.params:
            if key not in varying and key not in (*OWNED_KEYS, "task") and len({t.params.get(key) for t in study.trials}) > 1:
                varying[key] = None
    return varying


def leaderboard(study: Study) -> pd.DataFrame:
    """Per cell: BBC-CV C (headline), the selected configuration's own metrics, the reference's."""
    rows = []
    for (backbone, task, inputs), trial in study.best_per_cell().items():
        m, cell = trial.metrics, trial.cell
        bbc = [study.cell_metric(cell, x) for x in (names.BBC_CINDEX, names.BBC_CINDEX_LOW, names.BBC_CINDEX_HIGH)]
        searched = [k for k in searched_parameters(study) if k in trial.params]
        rows.append({
            "backbone": backbone, "task": task, "inputs": inputs,
            "C-index, BBC-CV [95% CI]": f"{bbc[0]:.3f} [{bbc[1]:.3f}, {bbc[2]:.3f}]" if None not in bbc else "",
            **metric_columns(m, ", selected [95% CI]"),
            "C-index, reference recipe": _fmt(study.cell_metric(cell, names.REFERENCE_CINDEX)),
            "per-fold C, mean +- SD": f"{_fmt(m.get(names.FOLD_CINDEX_MEAN.name))} +- "
                                      f"{_fmt(m.get(names.FOLD_CINDEX_SD.name))}",
            "folds that learned nothing": int(m.get(names.FOLDS_COLLAPSED.name, 0)),
            "selected configuration": ", ".join(f"{k}={_short(trial.params[k])}" for k in searched),
            "trial": trial.trial_id, "finished trials": sum(1 for t in study.finished() if t.cell == cell)})
    return pd.DataFrame(rows)


# Columns of the external validation table that tests and readers look up.
SPREAD_RATIO = "DPI spread ratio (SD external / SD development out-of-fold)"


@dataclass
class CellAnalysis:
    """A cell's selected trial, read back once: its fold models and development predictions."""

    backbone: str
    task: str
    inputs: str
    trial: Trial
    models: list[FoldModel]
    oof: pd.DataFrame  # out-of-fold predictions with the cohort's clinical columns
    horizon: float | None
    eval_times: tuple[float, ...]  # the trial's survival-curve times [days]
    scale: DevelopmentScale  # the ensemble DPI's map onto the out-of-fold DPI's scale

    @property
    def cell(self) -> str:
        return self.trial.cell

    @property
    def label(self) -> str:
        return f"{self.backbone} ({self.inputs})"


def load_cells(study: Study, store: CohortStore) -> list[CellAnalysis]:
    folds = study.config["protocol"]["folds"]
    clinical = store.clinical()
    cells = []
    for (backbone, task, inputs), trial in study.best_per_cell().items():
        oof = oof_predictions(study, trial)
        oof = pd.concat([oof, clinical.loc[oof["patient_id"]].drop(columns=["time", "event"]).reset_index(drop=True)],
                        axis=1)
        oof["dpi"] = oof["risk"]  # comparable across folds by construction (trainables.heads)
        cohort = Cohort(store, CohortSpec(TASKS[task].filter, TASKS[task].endpoint))
        eval_times = tuple(study.trial_config(trial).get("eval_times", TrainConfig().eval_times))
        models = load_fold_models(study.checkpoint_dir(trial), folds)
        # The scale the cell's logged model carries, so that its predictions are the report's to the last
        # digit (recomputed here, the ensemble's float noise differs from the driver's by ~1e-6).
        meta = logged_model_meta(study, trial.cell)
        if meta and meta.get("trial_id") == trial.trial_id and "dpi_scale" in meta:
            scale = DevelopmentScale.from_dict(meta["dpi_scale"])
        else:
            scale = development_scale(models, store, cohort.slots, cohort.clinical, oof["risk"].to_numpy(float))
        cells.append(CellAnalysis(backbone, task, inputs, trial, models, oof, cohort.horizon, eval_times, scale))
    return cells


def external_metrics(time, event, dpi, surv_365, curves, times, horizon) -> dict:
    """The external cohort's columns: every registered metric of the fold ensemble's predictions
    (`evaluation.prediction_metrics`), as the leaderboard shows the development ones."""
    predictions = Predictions(time, event, dpi, surv_365, curves, tuple(times), horizon)
    return metric_columns(score_predictions(predictions))


def out_of_fold_for_development_patients(pred: dict, patient_ids, matches: dict[str, str], oof: pd.DataFrame,
                                          times) -> tuple[dict, int]:
    """`pred` with the rows of external patients who are development patients (`matches`: external id
    -> development id, `datasets.external.development_matches`) replaced by their out-of-fold
    predictions: a patient the fold models trained on is never scored in-sample; its DPI and survival
    come from the fold model that did not see it, as in development. Returns the predictions and how
    many rows were replaced."""
    rows = oof.set_index("patient_id")
    pairs = [(k, matches[pid]) for k, pid in enumerate(patient_ids) if matches.get(pid) in rows.index]
    if not pairs:
        return pred, 0
    at, dev = [k for k, _ in pairs], [d for _, d in pairs]
    out = {key: np.array(value, dtype=float, copy=True) for key, value in pred.items()}
    out["risk"][at] = rows.loc[dev, "risk"].to_numpy(float)
    out["surv_365"][at] = rows.loc[dev, "surv_365"].to_numpy(float)
    columns = [f"surv_t{int(t)}" for t in times]
    if all(c in rows.columns for c in columns):
        out["curves"][at] = rows.loc[dev, columns].to_numpy(float)
    return out, len(pairs)


def choose_patients(oof: pd.DataFrame, n_random: int = 2, seed: int = 0) -> dict[str, int]:
    """Rows of `oof` to explain: highest/lowest DPI, best/worst predicted deaths, random ones."""
    chosen = {"highest DPI": int(oof["dpi"].idxmax()), "lowest DPI": int(oof["dpi"].idxmin())}
    deaths = oof[oof["event"] == 1]
    if len(deaths) >= 2:
        # Rank agreement between risk and earliness of death: |rank(DPI) - rank(-time)|.
        mismatch = (deaths["dpi"].rank() - (-deaths["time"]).rank()).abs()
        chosen["best predicted death"] = int(mismatch.idxmin())
        chosen["worst predicted death"] = int(mismatch.idxmax())
    rng = np.random.default_rng(seed)
    rest = [i for i in oof.index if i not in chosen.values()]
    for k, i in enumerate(rng.choice(rest, size=min(n_random, len(rest)), replace=False)):
        chosen[f"random {k + 1}"] = int(i)
    return chosen


def holm(p_values: pd.Series) -> pd.Series:
    """Holm's step-down adjustment of the non-missing p-values (family-wise error over the cells)."""
    values = pd.to_numeric(p_values, errors="coerce")
    known = values.dropna().sort_values()
    m, running, out = len(known), 0.0, pd.Series(np.nan, index=values.index)
    for rank, (index, p) in enumerate(known.items()):
        running = max(running, min(1.0, (m - rank) * p))
        out[index] = running
    return out.round(4)


def img_tag(source: str, width: int = 480, title: str = "") -> str:
    """An image of the page; every attribute escaped (a file name or title may hold a patient id)."""
    return (f"<img src='{html.escape(source)}' width='{int(width)}'" + (f" title='{html.escape(title)}'" if title else "")
            + ">")


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, classes="t", na_rep="")


def externals(study: Study, development: CohortStore, extra: Sequence) -> list[CohortStore]:
    """The study's external stores and the report's, each once (by resolved location), each checked
    to take the development store's models (`datasets.external`)."""
    from datasets.external import check_external

    seen, out = set(), []
    for location in [*study.config.get("external", []), *map(str, extra)]:
        path = stage_store(location)
        key = str(Path(path).resolve())
        if key not in seen:
            seen.add(key)
            store = CohortStore(path)
            check_external(store, development, "--external")
            out.append(store)
    return out


class Report:
    """The report's sections, written into `out` as they are computed; `html` collects the page.

    The page is fragments appended as each section computes (prose, `pandas.DataFrame.to_html`
    tables, which escape their cells, and figures), not a Jinja2 template: a template would hold
    every section's results until the end and split each section's prose from the code that
    knows what it says. Every string a user or an export controls (study name, store path,
    patient ids, covariate names) goes through `html.escape`, as on the QC page, where a patient id
    with markup is tested (`tests/test_datasets_bad_input.py`).
    """

    def __init__(self, study: Study, store: CohortStore, externals: list[CohortStore], out: Path,
                 clinical: Sequence[str] | None = None):
        self.study, self.store, self.externals, self.out = study, store, externals, out
        self.clinical = list(clinical) if clinical is not None else None
        self.html: list[str] = []

    def figure(self, name: str, width: int = 480, title: str = "") -> None:
        self.html.append(img_tag(name, width, title))

    def table(self, frame: pd.DataFrame, csv: str | None = None) -> None:
        if csv:
            frame.to_csv(self.out / csv, index=False)
        self.html.append(_table_html(frame))

    def header(self) -> None:
        study, config = self.study, self.study.config
        self.html += [f"<h1>Study {html.escape(study.name)}</h1>",
                      f"<p>Space {html.escape(str(config['space']))}, budget {html.escape(str(config['budget']))}, "
                      f"data {html.escape(str(self.store.path))} "
                      f"({len(self.store.usable())} patients), {config['protocol']['folds']}-fold CV; "
                      f"{len(study.trials)} trials ({len(study.finished())} finished).</p>"]

    def leaderboard(self) -> None:
        self.html.append("<h2>1. Leaderboard</h2><p>Per cell, the configuration with the best pooled out-of-fold "
                         "C-index. Headline: its <b>BBC-CV</b> C-index, which pays for the cell's whole search: in "
                         "each bootstrap sample ASHA's stops and the final choice are made again on the sample and "
                         "the choice is scored on the patients left out (study.headline; a study without the search's "
                         "records pays for the final choice only). The selected configuration's own pooled C is "
                         "optimistic by construction. 95% CIs by patient bootstrap.</p>")
        board = leaderboard(self.study)
        oracle = oracle_cindices(self.store, {t: Cohort(self.store, CohortSpec(TASKS[t].filter, TASKS[t].endpoint))
                                              for t in board["task"].unique()}) if len(board) else {}
        if oracle:
            self.html.append("<p>This store comes from <code>datasets.synthetic</code>: the last column is the "
                             "C-index, on the same patients, of its true clinical predictor / of what the images can "
                             "tell (E[lp | image content], the grade they show included: the ceiling of an image-only "
                             "cell) / of its true total predictor (the ceiling with clinical inputs): what there was "
                             "to learn.</p>")
            if any("image_content" not in v for v in oracle.values()):
                self.html.append(f"<p>Note: {html.escape(FALLBACK_NOTE)}.</p>")
            board["oracle C (true clinical / image content / total)"] = [oracle_text(oracle[t]) for t in board["task"]]
        self.table(board, "leaderboard.csv")

    def external_validation(self, cells: list[CellAnalysis]) -> dict:
        """Each cell's fold ensemble on every external store; returns {(cell, store): predictions}."""
        from datasets.external import development_matches

        rows, predictions = [], {}
        shared = {ext.path.name: development_matches(ext, self.store) for ext in self.externals}
        for cell in cells:
            spec = TASKS[cell.task]
            for ext in self.externals:
                cohort = Cohort(ext, CohortSpec(spec.filter, spec.endpoint))
                times = cell.eval_times
                pred = predict_ensemble(cell.models, ext.images(cohort.slots), times, cohort.clinical, cell.scale)
                ensemble_dpi = pred["risk"]  # what study.predict gives these images, kept beside the honest DPI
                pred, replaced = out_of_fold_for_development_patients(pred, cohort.patient_ids, shared[ext.path.name],
                                                                      cell.oof, times)
                rows.append({"backbone": cell.backbone, "task": cell.task, "inputs": cell.inputs,
                             "cohort": ext.path.name,
                             "patients": len(cohort), **external_metrics(cohort.time, cohort.event, pred["risk"],
                                                                         pred["surv_365"], pred["curves"], times,
                                                                         cohort.horizon),
                             "development patients among them": len(shared[ext.path.name]),
                             "scored out of fold": replaced,
                             "DPI scale factor (development)": round(cell.scale.factor, 3),
                             SPREAD_RATIO: round(float(np.std(pred["risk"])) / np.sqrt(cell.scale.oof_var), 3)
                             if cell.scale.oof_var > 0 else float("nan")})
                frame = pd.DataFrame({"patient_id": cohort.patient_ids, "time": cohort.time, "event": cohort.event,
                                      "dpi": pred["risk"], "dpi_fold_ensemble": ensemble_dpi,
                                      "surv_365": pred["surv_365"],
                                      **{f"surv_{t:g}": pred["curves"][:, k] for k, t in enumerate(times)}})
                frame.to_csv(self.out / f"external_{cell.cell}_{safe_name(ext.path.stem)}.csv", index=False)
                predictions[(cell.cell, ext.path.name)] = pd.concat(
                    [frame, cohort.clinical.drop(columns=["time", "event"]).reset_index(drop=True)], axis=1)
        if rows:
            self.html.append("<h2>2. External validation (fold ensembles)</h2><p>Each cell's K fold models applied "
                             "unchanged; DPI = mean of the folds' DPI on the development scale (regression "
                             "calibration onto the out-of-fold DPI, on which the combined Cox model and the risk "
                             "groups' cut-off were fitted; its factor is fixed on the development cohort). The spread "
                             "ratio compares the external DPI's SD with the development out-of-fold DPI's: near 1 "
                             "when the models vary on new patients as they did out of fold.</p>")
            overlap = {name: ids for name, ids in shared.items() if ids}
            for name, matches in overlap.items():
                ids = sorted(matches)
                self.html.append(f"<p><b>Warning</b>: {len(ids)} patient(s) of {html.escape(name)} have the images "
                                 "of development patients (the same source files). The fold models trained on them, so "
                                 "they are scored with their out-of-fold predictions (from the fold model that did not "
                                 "see them, as in development; column 'scored out of fold'), never in-sample; they are "
                                 "not an external validation: "
                                 f"{html.escape(', '.join(ids[:10]))}{' ...' if len(ids) > 10 else ''}.</p>")
            self.table(pd.DataFrame(rows), "external_validation.csv")
        else:
            self.html.append("<h2>2. External validation</h2><p>No external cohort: pass --external STORE.</p>")
        return predictions

    def backbone_choice(self, cells: list[CellAnalysis]) -> None:
        """Reading the best backbone off the leaderboard is one more choice on the same patients: per
        task and inputs, BBC-CV over the cells' selected configurations says what the best one's C is
        once that choice is paid for."""
        rows = []
        for (task, inputs), group in pd.DataFrame([{"task": c.task, "inputs": c.inputs, "cell": c} for c in cells]
                                                  ).groupby(["task", "inputs"], sort=False) if cells else []:
            members = list(group["cell"])
            if len(members) < 2:
                continue
            base = members[0].oof.sort_values("patient_id")
            risks = [m.oof.set_index("patient_id").loc[base["patient_id"], "risk"].to_numpy(float) for m in members]
            own = [harrell_c(base["time"], base["event"], r) for r in risks]
            try:
                paid = bbc_cv(base["time"].to_numpy(float), base["event"].to_numpy(int), risks, seed=0)
            except SurvivalDataError:
                continue
            best = members[int(np.argmax(own))]
            rows.append({"task": task, "inputs": inputs, "backbones compared": len(members),
                         "best backbone (own pooled C)": f"{best.backbone} ({max(own):.3f})",
                         "its C once the choice of backbone is paid for (BBC-CV) [95% CI]":
                             f"{paid.value:.3f} [{paid.low:.3f}, {paid.high:.3f}]",
                         "optimism of reading off the best": f"{max(own) - paid.value:+.3f}"})
        if rows:
            self.html.append("<h3>Choosing the best backbone</h3><p>Per task, the best backbone's C-index once choosing "
                             "it among the backbones is paid for (BBC-CV over the cells' selected configurations); "
                             "the difference from its own pooled C is what reading the best off the leaderboard "
                             "would overstate.</p>")
            self.table(pd.DataFrame(rows), "backbone_choice.csv")

    def inputs_comparison(self, cells: list[CellAnalysis], external: dict) -> None:
        """Per task: the clinical-only Cox model, the image-only and the image+clinical networks on the
        same patients and folds, with paired differences (`analysis.inputs_comparison`)."""
        columns = list(self.study.config.get("clinical_inputs") or FUSION_DEFAULT)
        summaries, differences = [], []
        for task in dict.fromkeys(c.task for c in cells):
            task_cells = [c for c in cells if c.task == task]
            base, horizon = task_cells[0].oof, task_cells[0].horizon
            models = {c.label: c.oof for c in task_cells}
            fits = None
            try:
                clinical, fits = clinical_oof(base, columns)
                models = {CLINICAL_MODEL: clinical, **models}
            except (StudyError, ValueError) as exc:
                summaries.append({"task": task, "cohort": "development (out-of-fold)", "model": CLINICAL_MODEL,
                                  "C-index [95% CI]": f"n/a ({str(exc).splitlines()[0][:200]})"})
            pairs = _input_pairs(task_cells, fits is not None)
            outcome = base[["patient_id", "time", "event"]]
            summary, diff = compare(outcome, models, horizon, pairs)
            summaries += summary.assign(task=task, cohort="development (out-of-fold)").to_dict("records")
            differences += diff.assign(task=task, cohort="development (out-of-fold)").to_dict("records")
            for ext in self.externals:
                frames = {c.label: external[(c.cell, ext.path.name)].rename(columns={"dpi": "risk"})
                          for c in task_cells if (c.cell, ext.path.name) in external}
                if not frames:
                    continue
                first = next(iter(frames.values()))
                if fits is not None:
                    frames = {CLINICAL_MODEL: first[["patient_id"]].assign(**ensemble_predict(fits, first)), **frames}
                summary, diff = compare(first[["patient_id", "time", "event"]], frames, horizon,
                                        [p for p in pairs if p[0] in frames and p[1] in frames])
                summaries += summary.assign(task=task, cohort=ext.path.name).to_dict("records")
                differences += diff.assign(task=task, cohort=ext.path.name).to_dict("records")
        self.html.append("<h2>3. Images, clinical factors, or both</h2><p>Per task, on the same patients and folds: "
                         f"a Cox model of the clinical factors alone ({html.escape(', '.join(columns))}; encoded as "
                         "the image+clinical networks encode them, fitted in the networks' folds, risk = log "
                         "cumulative "
                         "hazard at day 365), each cell's selected image-only network and image+clinical network "
                         "(whose DPI is its risk, clinical factors included). Out-of-fold C [95% CI] and Brier at day "
                         "365; differences of C on the same bootstrap resamples (paired). External cohorts: every "
                         "model applied unchanged (fold ensembles). Each network is its cell's selected "
                         "configuration, whose own out-of-fold C is optimistic (it was chosen for being the "
                         "highest; the leaderboard's BBC-CV C says by how much), while the Cox model was not "
                         "selected: read a network's development advantage over it with that in mind, and its "
                         "external one without.</p>")
        order = ["task", "cohort", "model", "patients", "C-index [95% CI]", "Brier (365 d)"]
        self.table(pd.DataFrame(summaries).reindex(columns=order), "inputs_comparison.csv")
        if differences:
            frame = pd.DataFrame(differences)
            self.table(frame[["task", "cohort", *[c for c in frame.columns if c not in ("task", "cohort")]]],
                       "inputs_differences.csv")

    def added_value(self, cells: list[CellAnalysis], external: dict) -> None:
        rows, calibration = [], []
        for cell in cells:
            if cell.inputs != IMAGE:
                rows.append({"backbone": cell.backbone, "task": cell.task, "inputs": cell.inputs,
                             "cohort": "development (out-of-fold)",
                             "note": f"not run: the DPI of an {cell.inputs} network already contains the clinical "
                                     "covariates (its gain over them is in the comparison of inputs above)"})
                continue
            tried = sum(t.cell == cell.cell for t in self.study.trials)  # the DPI was chosen among these
            row, fitted = added_value_row(cell.oof, covariates=self.clinical, configurations=max(1, tried))
            rows.append({"backbone": cell.backbone, "task": cell.task, "inputs": cell.inputs,
                         "cohort": "development (out-of-fold)", **row})
            if fitted is None:
                continue
            result, design, models = fitted
            name = f"calibration_{cell.cell}_dev.png"
            figures.calibration_plot(result.calibration, f"{cell.cell}: development", self.out / name)
            calibration.append(name)
            for (key, cohort_name), frame in external.items():
                if key == cell.cell:
                    rows.append({"backbone": cell.backbone, "task": cell.task, "inputs": cell.inputs,
                                 "cohort": cohort_name, **_external_value(frame, design, models)})
        covariates = ", ".join(self.clinical) if self.clinical is not None else \
            f"every mapped clinical column present ({', '.join(CLINICAL)} where present)"
        self.html.append("<h2>4. Added prognostic value of the DPI</h2><p>Cox models (lifelines): clinical vs clinical "
                         f"+ DPI; clinical covariates: {html.escape(covariates)}. Missing values: missing-indicator "
                         "coding (development means; counts below). Development: likelihood-ratio test (1 df) and the "
                         "C-index difference corrected for optimism (both models refitted in every bootstrap resample). "
                         "External cohorts: the development models applied unchanged, and the LR test refitted there. "
                         "<b>Primary test</b>: on an external cohort, its LR test (no choice of the study saw those "
                         "patients); on development data, the LR p-value multiplied by the number of configurations "
                         "the cell tried, because the DPI is the one chosen among them on these patients (the "
                         "unadjusted p is exploratory: it rejects 19% of the time at 0.05 for the best of 20 "
                         "configurations with no added value, benchmarks/results/added_value_selection.md). "
                         "Across cells, the development primary p-values are also Holm-adjusted (column Holm): "
                         "reading off the best backbone is one more choice.</p>")
        frame = pd.DataFrame(rows)
        primary = [c for c in frame.columns if c.startswith("LR p x ")]
        if primary:
            frame["Holm across cells"] = holm(frame[primary].bfill(axis=1).iloc[:, 0])
        self.table(frame, "added_value.csv")
        self.html.append("<h3>1-year calibration (clinical + DPI model, development)</h3>")
        for name in calibration:
            self.figure(name, 360)

    def kaplan_meier(self, cells: list[CellAnalysis], external: dict) -> None:
        rows = []
        self.html.append("<h2>5. Kaplan-Meier: low vs high DPI</h2><p>Cut-off: median DPI of the development "
                         "out-of-fold predictions, applied unchanged to external cohorts.</p>")
        for cell in cells:
            oof = cell.oof
            # The cut-off is fixed here, on development data, and reused unchanged for external cohorts.
            cutoff = float(np.median(oof["dpi"]))
            groups = [("development", "dev", oof["time"], oof["event"], oof["dpi"])]
            groups += [(name, safe_name(Path(name).stem), f["time"], f["event"], f["dpi"])
                       for (key, name), f in external.items() if key == cell.cell]
            for cohort, stem, time, event, dpi in groups:
                figure = f"km_{cell.cell}_{stem}.png"
                p = figures.km_by_dpi(time, event, dpi, cutoff, f"{cell.cell}: {cohort}"
                                      + (" (development cut-off)" if stem != "dev" else ""), self.out / figure)
                self.figure(figure, title=f"log-rank p {p:.3g}")
                rows.append({"backbone": cell.backbone, "task": cell.task, "inputs": cell.inputs, "cohort": cohort,
                             "cutoff": cutoff,
                             "high": int((np.asarray(dpi) > cutoff).sum()), "low": int((np.asarray(dpi) <= cutoff).sum()),
                             "logrank_p": p})
        pd.DataFrame(rows).to_csv(self.out / "kaplan_meier.csv", index=False)

    def gradcam(self, cells: list[CellAnalysis], n_random: int, seed: int) -> None:
        """Best cell per task: chosen patients explained by the fold model that did not train on them;
        with tumour labels, the attention's enrichment on tumour + oedema (`attention_in_region`)."""
        best: dict[str, CellAnalysis] = {}
        for cell in cells:
            if cell.task not in best or cell.trial.ranks_above(best[cell.task].trial):
                best[cell.task] = cell
        store, rows, shown = self.store, [], []
        for task, cell in best.items():
            oof = cell.oof
            chosen = choose_patients(oof, n_random=n_random, seed=seed)
            top = oof.nlargest(min(10, len(oof)), "dpi").index  # the best-ranked (highest-risk) patients
            for row in dict.fromkeys([*chosen.values(), *top]):
                pid = oof.loc[row, "patient_id"]
                slot = store.patient_ids.index(pid)
                image = store.image(slot).astype(np.float32)
                fold_model = cell.models[int(oof.loc[row, "fold"])]
                network = fold_model.image_network
                cam = gradcam_map(network, image, fold_model.head)
                label, mask = store.label(slot), store.mask(slot)
                if label.any():
                    control = attention_in_region(gradcam_map(untrained_twin(network), image, fold_model.head), mask,
                                                  label)
                    rows.append({"task": task, "cell": cell.cell, "patient_id": pid, "DPI rank": int(
                        (oof["dpi"] > oof.loc[row, "dpi"]).sum()) + 1, **attention_in_region(cam, mask, label),
                        "enrichment, untrained twin": control["enrichment"]})
                reasons = [reason for reason, r in chosen.items() if r == row]
                if not reasons:
                    continue
                name = f"gradcam_{cell.cell}_{safe_name(pid)}"
                overlay(image, store.sequences, cam, mask, label,
                        f"{cell.cell}: {pid} ({reasons[0]}; DPI {oof.loc[row, 'dpi']:+.2f}, "
                        f"{'death' if oof.loc[row, 'event'] else 'censored'} at {oof.loc[row, 'time']:.0f} d)",
                        self.out / f"{name}.png")
                save_nifti(cam, store.affine(slot), self.out / f"{name}.nii.gz")
                shown.append(f"{name}.png")
        self.html.append("<h2>6. Grad-CAM</h2><p>Best cell per task; each patient explained by the fold model that "
                         "did not train on it; rows through the map's maximum and, where the store has a tumour label, "
                         "through the tumour's centre (coronal and sagittal planes were the most telling in the "
                         "reference study). NIfTI maps beside the PNGs. For an image+clinical network the map is that "
                         "of its image branch: the clinical term adds to the risk without depending on the image "
                         "(trainables.fusion).</p>")
        if rows:
            table = pd.DataFrame(rows)
            table.to_csv(self.out / "gradcam_attention.csv", index=False)
            summary = (table[table["DPI rank"] <= 10].groupby(["task", "cell"])
                       [["enrichment", "enrichment, untrained twin", "enrichment_axial", "enrichment_coronal",
                         "enrichment_sagittal", "hit", "region_share"]].mean().round(3).reset_index())
            self.html.append("<p>Attention on tumour + oedema for the 10 highest-DPI patients: enrichment = share of "
                             "the map's mass inside the region / the region's share of the head (1 = uniform), in 3D "
                             "and in the planes through the tumour; hit = the map's maximum lies in the region "
                             "(pointing game). Control: the same network untrained, whose maps also favour bright "
                             "tumours; attention the model learned shows as enrichment above its twin's. Per patient: "
                             "gradcam_attention.csv.</p>")
            self.table(summary, "gradcam_attention_summary.csv")
        for name in shown:
            self.figure(name, 640)

    def search_diagnostics(self) -> None:
        self.html.append("<h2>7. Search diagnostics</h2><p>Finished trials: their pooled out-of-fold C-index; trials "
                         "ASHA stopped: the folds' mean validation C-index at the epoch they were stopped (a "
                         "different, per-epoch quantity, marked x).</p>")
        searched, study = searched_distributions(self.study), self.study
        cells = sorted({Cell(t.backbone, t.task, t.inputs) for t in study.trials},
                       key=lambda c: (c.task, c.inputs, c.backbone))
        for cell in cells:
            cell_trials = [t for t in study.trials if t.cell == cell.name]
            params = [k for k in searched if all(k in t.params for t in cell_trials)]
            rows = []
            for t in cell_trials:
                row = {"value": t.metrics.get(names.SELECTED_BY.name, np.nan) if t.status == "FINISHED" else np.nan,
                       "stopped_value": t.metrics.get(names.EPOCH_CINDEX.name, np.nan)}
                for k in params:
                    try:
                        row[k] = float(t.params[k])
                    except ValueError:
                        row[k] = t.params[k]
                rows.append(row)
            name = f"search_{cell.name}.png"
            figures.search_diagnostics(pd.DataFrame(rows), {k: searched[k] for k in params},
                                       f"{cell.backbone} / {cell.task} / {cell.inputs}", self.out / name)
            self.figure(name, 900)

    def write(self) -> Path:
        style = ("<style>body{font-family:sans-serif;margin:1em 2em} table.t{border-collapse:collapse;font-size:85%;"
                 "margin:.5em 0} .t td,.t th{border:1px solid #ccc;padding:2px 6px} img{margin:4px}</style>")
        index = self.out / "index.html"
        index.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.study.name)}"
                         f"</title>{style}</head><body>{''.join(self.html)}</body></html>")
        return index


def _input_pairs(cells: list[CellAnalysis], with_clinical: bool) -> list[tuple[str, str]]:
    """Per backbone: image+clinical vs image, and each network vs the clinical Cox model."""
    pairs = []
    by_backbone: dict[str, dict[str, str]] = {}
    for cell in cells:
        by_backbone.setdefault(cell.backbone, {})[cell.inputs] = cell.label
    for labels in by_backbone.values():
        if IMAGE_CLINICAL in labels and IMAGE in labels:
            pairs.append((labels[IMAGE_CLINICAL], labels[IMAGE]))
        if with_clinical:
            pairs += [(label, CLINICAL_MODEL) for label in labels.values()]
    return pairs


def _external_value(frame: pd.DataFrame, design: Design, models: Models) -> dict:
    try:
        return external_added_value(frame, design, models)
    except (SurvivalDataError, ValueError) as exc:
        return {"patients": len(frame), "note": f"not estimable: {str(exc).splitlines()[0][:200]}"}
