"""``python -m analysis.report --study NAME``: the study's tables and figures as an HTML folder.

Sections: leaderboard (per backbone x task x inputs: the selected configuration's BBC-CV C-index, its
naive pooled out-of-fold C-index [95% CI], the reference recipe's, per-fold mean +- SD, Brier
score at 365 days, IBS, Uno's C, AUC at 365 days); external validation of each cell's fold
ensemble; images, clinical factors or both (a clinical-only Cox model in the networks' folds, the
image-only and image+clinical networks, with paired differences of C); added prognostic value of
an image-only DPI over clinical factors (likelihood-ratio test,
optimism-corrected C-index difference, HR per SD, 1-year calibration; on external cohorts the
development models applied unchanged); Kaplan-Meier curves of low vs high DPI (cut-off: the
development median, applied unchanged to external cohorts); Grad-CAM overlays in three planes
with, on synthetic cohorts, how much of the attention falls on the tumour; search diagnostics.
Every figure is a PNG and every table a CSV in the output folder, which is also logged to the
study's parent MLflow run under ``report/``.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from datasets.clinical import COVARIATES as CLINICAL
from datasets.errors import InputError, StudyError
from evaluation import metric_names as names


def build_report(study_name: str, tracking_uri: str, out: Path, external: Sequence = (), gradcam_patients: int = 2,
                 log: bool = True, clinical: Sequence[str] | None = None) -> Path:
    """Write the report folder (index.html, PNGs, CSVs) and log it to the study run."""

    from analysis.sections import Report, externals, load_cells
    from analysis.study_reader import attach_folder, read_study
    from datasets.remote import stage_store
    from datasets.store import CohortStore

    warnings.filterwarnings("ignore", module="lifelines")
    if clinical is not None:
        unknown = [c for c in clinical if c not in CLINICAL]
        if unknown:
            raise InputError(f"--clinical: unknown covariates {unknown}; valid covariates are {list(CLINICAL)}")
    study = read_study(study_name, tracking_uri)
    store = CohortStore(stage_store(study.config["data"]))
    external_stores = externals(study, store, external)  # checked before anything is written
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    report = Report(study, store, external_stores, out, clinical)
    report.header()
    report.leaderboard()
    cells = load_cells(study, store)
    report.backbone_choice(cells)
    external_predictions = report.external_validation(cells)
    report.inputs_comparison(cells, external_predictions)
    report.added_value(cells, external_predictions)
    report.kaplan_meier(cells, external_predictions)
    report.gradcam(cells, gradcam_patients, study.config.get("seed", 0))
    report.search_diagnostics()
    index = report.write()
    if log:
        attach_folder(tracking_uri, study.parent_run_id, out, names.REPORT_PATH)
    return index


def main(argv: Sequence[str] | None = None) -> int:
    from datasets.cli import new_parser

    parser = new_parser("analysis.report", __doc__.split("\n\n")[0])
    required = parser.add_argument_group("required")
    required.add_argument("--study", required=True, help="study name (the MLflow experiment)")
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}"),
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI if set, else sqlite:///$PWD/mlflow.db)")
    inputs.add_argument("--external", nargs="*", default=[], metavar="STORE",
                        help="external cohort stores (paths or s3:// gs:// URIs)")
    inputs.add_argument("--clinical", nargs="+", default=None, metavar="COVARIATE",
                        help=f"clinical covariates of the added-value models, among {' '.join(CLINICAL)} "
                             "(default: every one the store has)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=None, help="report folder (default: report-STUDY)")
    output.add_argument("--gradcam-random", type=int, default=2, help="random patients explained per task")
    output.add_argument("--no-log", action="store_true", help="do not log the report to the study run")
    args = parser.parse_args(argv)
    if args.gradcam_random < 0:
        print(f"error: --gradcam-random must be 0 or more, got {args.gradcam_random}", file=sys.stderr)
        return 2
    try:
        index = build_report(args.study, args.tracking_uri, args.out or Path(f"report-{args.study}"), args.external,
                             args.gradcam_random, log=not args.no_log, clinical=args.clinical)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
