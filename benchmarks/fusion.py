"""Known answer for the fusion model: on a synthetic cohort whose clinical and imaging effects on
the hazard are known, does the image+clinical network beat both of its parents?

    python -m benchmarks.fusion [--patients 600] [--epochs 20] [--folds 3] [--backbone densenet121]
                                [--augmentation 1.5 1.0]

A `datasets.synthetic` cohort (demo generator and preprocessing, built through the real
converter), overall survival of all patients, K-fold CV in the same folds for three models:

- the clinical-only Cox model (`analysis.inputs_comparison`, the fusion's clinical columns
  encoded on each training fold);
- the image-only network: the demo protocol's reference recipe of `literature_priors` for the
  backbone (width, depth, learning rate, batch), predictions of the last epoch, at each
  augmentation strength given (1.5 is the demo's reference, chosen on its 150 patients; 1.0 the
  space's full reference): both are reported, neither is selected;
- the image+clinical network (`trainables.fusion`): the same recipe and backbone, the clinical
  branch linear (the space's reference).

Reported next to the oracle C-indices of the cohort's true clinical, imaging and total linear
predictors on the same patients, with paired bootstrap differences. Targets (issue 17): the
fusion within 0.03 of the total oracle, and above both the clinical-only and image-only models.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.metrics import harrell_c
from benchmarks._machine import describe, markdown_table, write_result
from benchmarks.learning import cross_validate, recipe

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fusion", description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--backbone", default="densenet121")
    parser.add_argument("--augmentation", type=float, nargs="+", default=[1.5, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fusion.md")
    args = parser.parse_args(argv)
    import torch

    from analysis.inputs_comparison import CLINICAL_MODEL, clinical_oof, compare
    from datasets import Cohort
    from datasets.clinical_features import FUSION_DEFAULT
    from datasets.synthetic import SyntheticConfig, build_store
    from study.demo import DEMO_PREPROCESSING, DEMO_VOXEL_SIZE

    torch.set_num_threads(2)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = build_store(root, SyntheticConfig(n=args.patients, voxel_size=DEMO_VOXEL_SIZE, seed=args.seed),
                            DEMO_PREPROCESSING, workers=2)
        cohort = Cohort(store)
        volumes = cohort.store.images(cohort.slots)
        truth = pd.read_csv(root / "export" / "truth.csv").set_index("patient_id").loc[cohort.patient_ids]
        folds = cohort.folds(args.folds, args.seed)
        outcome = pd.DataFrame({"patient_id": cohort.patient_ids, "time": cohort.time, "event": cohort.event})
        frame = pd.concat([outcome, cohort.clinical.drop(columns=["time", "event"]).reset_index(drop=True)], axis=1)
        seconds, predictions = {}, {}
        t0 = time.perf_counter()
        predictions[CLINICAL_MODEL], _ = clinical_oof(frame.assign(fold=folds), FUSION_DEFAULT)
        seconds[CLINICAL_MODEL] = time.perf_counter() - t0
        pairs, recipes = [], []
        for strength in args.augmentation:
            image = replace(recipe(args.backbone, args.epochs), augmentation=strength)
            image_name, fusion = (f"{args.backbone} ({inputs}, augmentation {strength:g})"
                                  for inputs in ("image", "image+clinical"))
            recipes.append((strength, image_name, fusion))
            pairs += [(fusion, image_name), (fusion, CLINICAL_MODEL), (image_name, CLINICAL_MODEL)]
            for name, config in ((image_name, image), (fusion, replace(image, inputs="image+clinical"))):
                t0 = time.perf_counter()
                oof, _ = cross_validate(cohort, volumes, config, args.folds, args.seed, root / f"run{len(seconds)}")
                predictions[name] = oof.reset_index()
                seconds[name] = time.perf_counter() - t0
    summary, differences = compare(outcome, predictions, None, pairs, n_resamples=1000, seed=args.seed)
    oracle = {k: harrell_c(cohort.time, cohort.event, truth[column])
              for k, column in (("clinical", "lp_clinical"), ("imaging", "lp_imaging"), ("total", "lp"))}
    pooled = {name: harrell_c(cohort.time, cohort.event, p.set_index("patient_id").loc[cohort.patient_ids, "risk"])
              for name, p in predictions.items()}
    summary["r(risk, true total lp)"] = [
        round(float(np.corrcoef(p.set_index("patient_id").loc[cohort.patient_ids, "risk"], truth["lp"])[0, 1]), 3)
        for p in predictions.values()]
    summary["seconds"] = [round(seconds[name]) for name in summary["model"]]
    targets = []
    for strength, image_name, fusion in recipes:
        targets += [
            (strength, "fusion C within 0.03 of the total oracle", pooled[fusion] >= oracle["total"] - 0.03,
             f"{pooled[fusion]:.3f} vs {oracle['total']:.3f} (gap {oracle['total'] - pooled[fusion]:.3f})"),
            (strength, "fusion above the clinical-only Cox model", pooled[fusion] > pooled[CLINICAL_MODEL],
             f"{pooled[fusion]:.3f} vs {pooled[CLINICAL_MODEL]:.3f}"),
            (strength, "fusion above the image-only network", pooled[fusion] > pooled[image_name],
             f"{pooled[fusion]:.3f} vs {pooled[image_name]:.3f}")]
    lines = ["# Fusion known answer: clinical-only Cox vs image-only vs image+clinical network", "", describe(), "",
             f"`python -m benchmarks.fusion --patients {args.patients} --epochs {args.epochs} --folds {args.folds} "
             f"--backbone {args.backbone} --augmentation {' '.join(f'{a:g}' for a in args.augmentation)} "
             f"--seed {args.seed}`: a synthetic cohort of {args.patients} patients "
             f"(demo generator and preprocessing), overall survival of all patients ({int(cohort.event.sum())} "
             f"deaths), {args.folds}-fold CV in the same folds for the three models; networks: the demo protocol's "
             f"reference recipe of `literature_priors` at the CPU width, {args.epochs} epochs, last epoch; clinical "
             f"inputs of the fusion and the Cox model: {', '.join(FUSION_DEFAULT)}.", "",
             "## Out-of-fold C-index and Brier score", "", markdown_table(summary), "",
             "Oracle C-index of the true linear predictors on the same patients: "
             + ", ".join(f"{k} {v:.3f}" for k, v in oracle.items()) + ".", "",
             "## Paired differences (same bootstrap resamples of patients)", "", markdown_table(differences), "",
             "## Targets", "", markdown_table(pd.DataFrame(
                 [{"augmentation": a, "target": t, "met": "yes" if ok else "no", "measured": m}
                  for a, t, ok, m in targets])), "",
             f"{time.perf_counter() - started:.0f} s in all (cohort build included)."]
    write_result(args.out, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
