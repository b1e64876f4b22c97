"""Score new patients with a study's model: ``python -m study.predict``.

    python -m study.predict --model models:/literature_priors-demo-densenet121__os_all/1 \\
        --images new_patients/ --out scored/

The model is a cell's fold ensemble as the study logged it (`analysis.pyfunc_model`): by MLflow
reference (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/model``) or by
``--study NAME --cell CELL``. The patients are a folder with one sub-folder per patient, as the
converter reads a site export; no outcome is needed, and a clinical table (``--clinical``,
``patient_id`` and the covariates) only for a cell whose networks read clinical values. Each patient
is preprocessed exactly as the development store was (the parameters the model records), and gets
the fold ensemble's DPI (the mean of the folds'), its risk group by the development cut-off, its
survival curve and Grad-CAM map (`analysis.scoring`). Written to ``--out``: ``predictions.csv``,
``index.html`` and one page per patient under ``pages/`` (`analysis.patient_pages`).

Exit status: 0 when every patient was scored, 1 when some were not (the CSV and pages hold the
others; the reasons are printed and listed on the index page), 2 for bad flags, a model that
cannot be found or reproduced, or no patient scored (nothing is written).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from datasets.cli import new_parser
from datasets.clinical_features import IMAGE_CLINICAL
from datasets.errors import StudyError

EXIT_BAD_INPUT, EXIT_SOME_NOT_SCORED = 2, 1


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("study.predict", "Score new patients (no outcome needed) with a cell's model: DPI, risk "
                                         "group, survival curve, Grad-CAM; a CSV and one HTML page per patient.")
    which = parser.add_argument_group("the model (one of)")
    which.add_argument("--model", metavar="URI", help="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/model, "
                                                      "or a model folder")
    which.add_argument("--study", metavar="NAME", help="the study whose cell's model to use (with --cell)")
    which.add_argument("--cell", metavar="CELL", help="the cell, as the results table names it (densenet121__os_all)")
    which.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI (default: MLFLOW_TRACKING_URI if set, else sqlite:///$PWD/mlflow.db)")
    data = parser.add_argument_group("the new patients")
    data.add_argument("--images", type=Path, required=True,
                      help="folder with one sub-folder per patient (NIfTI, DICOM in any arrangement, or BIDS)")
    data.add_argument("--clinical", type=Path, default=None,
                      help="CSV with patient_id and covariates (only for image+clinical models; no outcome needed)")
    data.add_argument("--column", action="append", default=[], metavar="NAME=CSV_COLUMN",
                      help="map a clinical column, as the converter does")
    data.add_argument("--pattern", action="append", default=[], metavar="SEQUENCE=REGEX",
                      help="file names of a sequence, as the converter's --pattern")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="folder to write predictions.csv and the pages to")
    out.add_argument("--no-gradcam", action="store_true", help="skip the Grad-CAM maps (faster)")
    return parser


def model_uri(args: argparse.Namespace, tracking_uri: str) -> str:
    """The MLflow URI of the model the flags name."""
    if args.model and (args.study or args.cell):
        raise StudyError("give either --model or --study with --cell, not both")
    if args.model:
        return args.model
    if not (args.study and args.cell):
        raise StudyError("name the model: --model URI, or --study NAME --cell CELL")
    from analysis.study_reader import cell_model_uri

    return cell_model_uri(tracking_uri, args.study, args.cell)


def load_model(uri: str, tracking_uri: str):
    """The cell's `FoldEnsembleModel`, loaded through MLflow."""
    import mlflow

    from analysis.pyfunc_model import FoldEnsembleModel

    mlflow.set_tracking_uri(tracking_uri)
    try:
        loaded = mlflow.pyfunc.load_model(uri)
    except Exception as exc:
        raise StudyError(f"--model {uri}: cannot be loaded from {tracking_uri} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from exc
    model = loaded.unwrap_python_model()
    if not isinstance(model, FoldEnsembleModel):
        raise StudyError(f"--model {uri} is not a study's cell model ({type(model).__name__})")
    return model


def check_flags(args: argparse.Namespace) -> None:
    if not args.images.is_dir():
        raise StudyError(f"--images {args.images} is not a folder")
    if args.clinical is not None and not args.clinical.is_file():
        raise StudyError(f"--clinical {args.clinical} is not a file")
    if args.out.exists() and not args.out.is_dir():
        raise StudyError(f"--out {args.out} is a file")
    if args.out.is_dir() and (args.out / "predictions.csv").exists():
        raise StudyError(f"--out {args.out} already holds predictions.csv; give a new folder")


def predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from analysis.patient_pages import write_pages
    from analysis.scoring import check_model, gradcam_maps, read_new_patients, score
    from datasets.clinical import parse_column_map, read_covariates
    from datasets.sequences import parse_patterns

    started = time.perf_counter()
    check_flags(args)
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    patterns = parse_patterns(args.pattern)
    column_map = parse_column_map(args.column)
    uri = model_uri(args, tracking_uri)
    model = load_model(uri, tracking_uri)
    meta = model.meta
    check_model(meta, uri)
    clinical, clinical_excluded = (read_covariates(args.clinical, column_map) if args.clinical is not None
                                   else (None, {}))
    if meta["inputs"] == IMAGE_CLINICAL and clinical is None:
        raise StudyError(f"--model {uri} (cell {meta['cell']}) also reads clinical values: pass --clinical CSV")
    print(f"model {uri}: cell {meta['cell']} of study {meta['study']} ({meta['folds']} fold models)", flush=True)
    patients = read_new_patients(args.images, meta, patterns)
    for pid, why in clinical_excluded.items():
        if pid in patients.ids:
            print(f"  note: {pid}: clinical row not used ({why}); its covariates are imputed", flush=True)
    if not patients.ids:
        raise StudyError(f"--images {args.images}: no patient could be scored: "
                         + "; ".join(f"{k}: {v}" for k, v in list(patients.excluded.items())[:5]))
    scores = score(model, patients, clinical)
    maps = {} if args.no_gradcam else {pid: gradcam_maps(model, patients.images[i])
                                       for i, pid in enumerate(patients.ids)}
    args.out.mkdir(parents=True, exist_ok=True)
    index = write_pages(args.out, scores, patients, meta, uri, maps)
    scores.to_csv(args.out / "predictions.csv", index=False, float_format="%.6g")
    if patients.excluded:
        pd.DataFrame({"patient_id": list(patients.excluded), "reason": list(patients.excluded.values())}).to_csv(
            args.out / "not_scored.csv", index=False)
    for _, row in scores.iterrows():
        print(f"  {row['patient_id']}: DPI {row['dpi']:+.3f} ({row['risk_group']} risk), "
              f"survival at 1 year {row['surv_365']:.2f}", flush=True)
    for pid, why in patients.excluded.items():
        print(f"  not scored {pid}: {why}", flush=True)
    print(f"Scored {len(patients.ids)} patient(s) in {time.perf_counter() - started:.0f} s: "
          f"{args.out / 'predictions.csv'}; pages: {index}", flush=True)
    return EXIT_SOME_NOT_SCORED if patients.excluded else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return predict(args)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
