"""``python -m analysis.report --study NAME``: the study's tables and figures as an HTML folder.

Sections: leaderboard (best configuration per backbone x task: CV C-index [95% CI], Brier score
at 365 days, IBS, Uno's C); external validation of each cell's fold ensemble; added prognostic
value of the DPI over clinical factors (likelihood-ratio test, C-index difference, HR per SD,
1-year calibration); Kaplan-Meier curves of low vs high DPI (cut-off: the development median,
applied unchanged to external cohorts); Grad-CAM overlays in three planes; search diagnostics.
Every figure is a PNG and every table a CSV in the output folder, which is also logged to the
study's parent MLflow run under ``report/``.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures
from analysis.added_value import added_value_row
from datasets.remote import stage_store
from analysis.ensemble import load_fold_models, predict_external, standardised_oof
from analysis.gradcam import gradcam_map, overlay, save_nifti
from analysis.metrics import SurvivalDataError, bootstrap_ci, brier_score, harrell_c, integrated_brier_score
from analysis.study_reader import Study, Trial, oof_predictions, read_study
from datasets.cohort import Cohort, CohortSpec
from datasets.errors import StudyError
from datasets.store import CohortStore
from search_spaces import TASKS

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.3g}"


def searched_parameters(study: Study) -> list[str]:
    """The parameters the study searched (from its space), in the space's order."""
    from search_spaces import SPACES

    space = SPACES.get(study.config.get("space", ""))
    if space is None:
        return ["lr", "weight_decay", "batch_size", "optimizer", "dropout", "augmentation"]
    return list(space.distributions_for(study.config.get("budget", "full")))


def leaderboard(study: Study) -> pd.DataFrame:
    rows = []
    for (backbone, task), trial in sorted(study.best_per_cell().items(), key=lambda kv: (kv[0][1], kv[0][0])):
        m = trial.metrics
        searched = [k for k in searched_parameters(study) if k in trial.params]
        rows.append({"backbone": backbone, "task": task,
                     "C-index [95% CI]": f"{m['cindex']:.3f} [{m['cindex_low']:.4f}, {m['cindex_high']:.4f}]",
                     "Brier (365 d)": round(m.get("brier_365", np.nan), 4), "IBS": round(m.get("ibs", np.nan), 4),
                     "Uno's C": round(m.get("uno_c", np.nan), 3), "AUC (365 d)": round(m.get("auc_365", np.nan), 3),
                     "best config": ", ".join(f"{k}={_short(trial.params[k])}" for k in searched),
                     "trial": trial.trial_id, "finished trials": sum(1 for t in study.finished() if t.cell == trial.cell)})
    return pd.DataFrame(rows)


def external_metrics(time, event, dpi, surv_365, curves, times) -> dict:
    out = {}
    try:
        estimate = bootstrap_ci(harrell_c, time, event, dpi, n_resamples=1000, seed=0)
        out["C-index [95% CI]"] = str(estimate)
    except SurvivalDataError as exc:
        out["C-index [95% CI]"] = f"n/a ({exc})"
    out["Brier (365 d)"] = round(float(brier_score(time, event, surv_365, 365.0)[0]), 4)
    usable = [k for k, t in enumerate(times) if t < time.max()]
    out["IBS"] = round(integrated_brier_score(time, event, curves[:, usable], np.asarray(times)[usable]), 4) \
        if len(usable) >= 2 else np.nan
    return out


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


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, classes="t", na_rep="")


def build_report(study_name: str, tracking_uri: str, out: Path, external: Sequence[Path] = (),
                 gradcam_patients: int = 2, log: bool = True) -> Path:
    """Write the report folder (index.html, PNGs, CSVs) and log it to the study run."""
    warnings.filterwarnings("ignore", module="lifelines")
    study = read_study(study_name, tracking_uri)
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    store = CohortStore(stage_store(study.config["data"]))
    externals = [CohortStore(stage_store(p)) for p in [*study.config.get("external", []), *map(str, external)]]
    folds = study.config["protocol"]["folds"]
    seed = study.config.get("seed", 0)
    html_parts = [f"<h1>Study {html.escape(study.name)}</h1>",
                  f"<p>Space {study.config['space']}, budget {study.config['budget']}, data {html.escape(str(store.path))} "
                  f"({len(store.usable())} patients), {folds}-fold CV; {len(study.trials)} trials "
                  f"({len(study.finished())} finished).</p>"]

    board = leaderboard(study)
    board.to_csv(out / "leaderboard.csv", index=False)
    html_parts += ["<h2>1. Leaderboard</h2><p>Best configuration per backbone x task, pooled out-of-fold predictions; "
                   "95% CI by patient bootstrap.</p>", _table_html(board)]

    value_rows, external_rows, km_rows, km_figures, calibration_figures, cam_figures = [], [], [], [], [], []
    best_per_task: dict[str, Trial] = {}
    task_volumes: dict[str, np.ndarray] = {}
    all_clinical = store.clinical()
    for (backbone, task), trial in sorted(study.best_per_cell().items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if task not in best_per_task or trial.metrics["cindex"] > best_per_task[task].metrics["cindex"]:
            best_per_task[task] = trial
        cell = f"{backbone}__{task}"
        config = study.trial_config(trial)
        if task not in task_volumes:  # read each task's volumes once, not once per backbone
            spec = TASKS[task]
            task_volumes[task] = store.images(Cohort(store, CohortSpec(spec.filter, spec.endpoint)).slots)
        models = load_fold_models(study.checkpoint_dir(trial), config, store, task, folds, seed, task_volumes[task])
        oof = oof_predictions(study, trial)
        oof["dpi"] = standardised_oof(models, oof)
        clinical = all_clinical.loc[oof["patient_id"]].reset_index(drop=True)
        frame = pd.concat([oof[["time", "event", "dpi"]], clinical.drop(columns=["time", "event"])], axis=1)
        row, result = added_value_row(frame)
        value_rows.append({"backbone": backbone, "task": task, "cohort": "development (out-of-fold)", **row})
        if result is not None:
            figures.calibration_plot(result.calibration, f"{cell}: development", out / f"calibration_{cell}_dev.png")
            calibration_figures.append(f"calibration_{cell}_dev.png")
        # The cut-off is fixed here, on development data, and reused unchanged for external cohorts.
        cutoff = float(np.median(oof["dpi"]))
        p = figures.km_by_dpi(oof["time"], oof["event"], oof["dpi"], cutoff, f"{cell}: development",
                              out / f"km_{cell}_dev.png")
        km_figures.append((f"km_{cell}_dev.png", p))
        km_rows.append({"backbone": backbone, "task": task, "cohort": "development", "cutoff": cutoff,
                        "high": int((oof["dpi"] > cutoff).sum()), "low": int((oof["dpi"] <= cutoff).sum()),
                        "logrank_p": p})
        spec = TASKS[task]
        for ext in externals:
            cohort = Cohort(ext, CohortSpec(spec.filter, spec.endpoint))
            pred = predict_external(models, ext, cohort.slots, config.get("eval_times", (90, 180, 270, 365, 540, 730)))
            times = config.get("eval_times", (90, 180, 270, 365, 540, 730))
            external_rows.append({"backbone": backbone, "task": task, "cohort": ext.path.name, "patients": len(cohort),
                                  **external_metrics(cohort.time, cohort.event, pred["dpi"], pred["surv_365"],
                                                     pred["curves"], times)})
            predictions = pd.DataFrame({"patient_id": cohort.patient_ids, "time": cohort.time, "event": cohort.event,
                                        "dpi": pred["dpi"], "surv_365": pred["surv_365"],
                                        **{f"surv_{t:g}": pred["curves"][:, k] for k, t in enumerate(times)}})
            predictions.to_csv(out / f"external_{cell}_{ext.path.stem}.csv", index=False)
            ext_frame = pd.concat([pd.DataFrame({"time": cohort.time, "event": cohort.event, "dpi": pred["dpi"]}),
                                   cohort.clinical.drop(columns=["time", "event"]).reset_index(drop=True)], axis=1)
            value_rows.append({"backbone": backbone, "task": task, "cohort": ext.path.name,
                               **added_value_row(ext_frame)[0]})
            name = f"km_{cell}_{ext.path.stem}.png"
            p = figures.km_by_dpi(cohort.time, cohort.event, pred["dpi"], cutoff, f"{cell}: {ext.path.stem} "
                                  "(development cut-off)", out / name)
            km_figures.append((name, p))
            km_rows.append({"backbone": backbone, "task": task, "cohort": ext.path.name, "cutoff": cutoff,
                            "high": int((pred["dpi"] > cutoff).sum()), "low": int((pred["dpi"] <= cutoff).sum()),
                            "logrank_p": p})
        if trial is best_per_task.get(task):
            best_models, best_oof = models, oof
            best_per_task[task]._models = (best_models, best_oof)  # type: ignore[attr-defined]

    values = pd.DataFrame(value_rows)
    values.to_csv(out / "added_value.csv", index=False)
    pd.DataFrame(km_rows).to_csv(out / "kaplan_meier.csv", index=False)
    if external_rows:
        pd.DataFrame(external_rows).to_csv(out / "external_validation.csv", index=False)
        html_parts += ["<h2>2. External validation (fold ensembles)</h2>", _table_html(pd.DataFrame(external_rows))]
    else:
        html_parts += ["<h2>2. External validation</h2><p>No external cohort: pass --external STORE.</p>"]
    html_parts += ["<h2>3. Added prognostic value of the DPI</h2><p>Cox models (lifelines) on complete cases: clinical "
                   "vs clinical + DPI; likelihood-ratio test (1 df); paired bootstrap CI of the C-index difference.</p>",
                   _table_html(values)]
    html_parts += ["<h3>1-year calibration (clinical + DPI model)</h3>"]
    html_parts += [f"<img src='{f}' width='360'>" for f in calibration_figures]
    html_parts += ["<h2>4. Kaplan-Meier: low vs high DPI</h2><p>Cut-off: median DPI of the development out-of-fold "
                   "predictions, applied unchanged to external cohorts.</p>"]
    html_parts += [f"<img src='{f}' width='480' title='log-rank p {p:.3g}'>" for f, p in km_figures]

    html_parts += ["<h2>5. Grad-CAM</h2><p>Best cell per task; each patient explained by the fold model that did not "
                   "train on it. NIfTI maps beside the PNGs.</p>"]
    for task, trial in best_per_task.items():
        models, oof = trial._models  # type: ignore[attr-defined]
        for reason, row in choose_patients(oof, n_random=gradcam_patients, seed=seed).items():
            pid = oof.loc[row, "patient_id"]
            slot = store.patient_ids.index(pid)
            model = models[int(oof.loc[row, "fold"])].trainer.model
            image = store.image(slot).astype(np.float32)
            cam = gradcam_map(model, image)
            name = f"gradcam_{trial.cell}_{pid}"
            label = store.label(slot)
            overlay(image, store.sequences, cam, store.mask(slot), label,
                    f"{trial.cell}: {pid} ({reason}; DPI {oof.loc[row, 'dpi']:+.2f}, "
                    f"{'death' if oof.loc[row, 'event'] else 'censored'} at {oof.loc[row, 'time']:.0f} d)",
                    out / f"{name}.png")
            save_nifti(cam, store.affine(slot), out / f"{name}.nii.gz")
            cam_figures.append(f"{name}.png")
    html_parts += [f"<img src='{f}' width='640'>" for f in cam_figures]

    html_parts += ["<h2>6. Search diagnostics</h2>"]
    searched = searched_parameters(study)
    for (backbone, task) in sorted({(t.backbone, t.task) for t in study.trials}, key=lambda bt: (bt[1], bt[0])):
        cell_trials = [t for t in study.trials if t.backbone == backbone and t.task == task]
        params = [k for k in searched if all(k in t.params for t in cell_trials)]
        rows = []
        for t in cell_trials:
            row = {"value": t.metrics.get("cindex", np.nan) if t.status == "FINISHED" else np.nan,
                   "cv_cindex": t.metrics.get("cv_cindex", np.nan)}
            for k in params:
                try:
                    row[k] = float(t.params[k])
                except ValueError:
                    row[k] = t.params[k]
            rows.append(row)
        name = f"search_{backbone}__{task}.png"
        figures.search_diagnostics(pd.DataFrame(rows), params, f"{backbone} / {task}", out / name)
        html_parts.append(f"<img src='{name}' width='900'>")

    style = ("<style>body{font-family:sans-serif;margin:1em 2em} table.t{border-collapse:collapse;font-size:85%;"
             "margin:.5em 0} .t td,.t th{border:1px solid #ccc;padding:2px 6px} img{margin:4px}</style>")
    index = out / "index.html"
    index.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study.name)}</title>"
                     f"{style}</head><body>{''.join(html_parts)}</body></html>")
    if log:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri).log_artifacts(study.parent_run_id, str(out), artifact_path="report")
    return index


def main(argv: Sequence[str] | None = None) -> int:
    from pathlib import Path as _Path

    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--study", required=True, help="study name (the MLflow experiment)")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{_Path.cwd() / 'mlflow.db'}", help="MLflow tracking URI")
    parser.add_argument("--out", type=_Path, default=None, help="report folder (default: report-STUDY)")
    parser.add_argument("--external", nargs="*", default=[], help="external cohort stores (paths or s3:// gs:// URIs)")
    parser.add_argument("--gradcam-random", type=int, default=2, help="random patients explained per task")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the study run")
    args = parser.parse_args(argv)
    try:
        index = build_report(args.study, args.tracking_uri, args.out or _Path(f"report-{args.study}"), args.external,
                             args.gradcam_random, log=not args.no_log)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
