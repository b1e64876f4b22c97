"""Does the study learn the imaging signal that is there? The reference recipe of each backbone
at the CPU width, trained with the same epoch budget on synthetic cohorts of growing size.

    python -m benchmarks.learning [--sizes 150 300 600] [--epochs 20] [--folds 3]

For each cohort size (a `datasets.synthetic` cohort built through the real converter, 32 x 32 x
24 voxels as the demo) and backbone: K-fold CV with the space's demo recipe (`literature_priors`,
budget ``demo``: width, depth, reference learning rate and batch size), the out-of-fold
predictions of the last epoch. Reported:

- the pooled out-of-fold C-index (OS, all patients) and the imaging oracle's C-index (the true
  imaging linear predictor on the same patients);
- the share of the oracle's gain over 0.5 that the network recovered, (C - 0.5) / (C_oracle - 0.5);
- the correlation of the out-of-fold DPI with the true imaging predictor;
- every fold's C-index (a fold that learned nothing shows as about 0.5, and is flagged).

Then, for the best backbone, the epoch-selection question of `trainables.fold`: the same
training with the epoch chosen on a 15 % selection split of each training fold, side by side
with the last epoch; and the Grad-CAM attention on tumour + oedema of the 10 highest-DPI
patients at the largest size (`analysis.gradcam.attention_in_region`).
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

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("seresnext50", "resnet50_cbam", "densenet121")


def recipe(backbone: str, epochs: int):
    """The demo protocol's reference recipe of `literature_priors` for one backbone."""
    from search_spaces import get_space
    from trainables.config import TrainConfig

    space = get_space("literature_priors")
    protocol = space.protocols["demo"]
    values = {**space.reference_for("demo"), **protocol.fixed}
    return TrainConfig(backbone=backbone, head="cox", width=protocol.width, depth=protocol.depth, epochs=epochs,
                       **values)


def cross_validate(cohort, volumes, config, folds: int, seed: int, work: Path):
    """Pooled out-of-fold predictions and per-fold results of one configuration."""
    from trainables.cross_validation import CohortArrays, CrossValidation

    cv = CrossValidation(CohortArrays(cohort, volumes), cohort.folds(folds, seed), config, work)
    while not cv.finished:
        cv.step()
    results = cv.results()
    return pd.concat([r.predictions for r in results]).set_index("patient_id").loc[cohort.patient_ids], results


def summarise(cohort, truth, oof, oracle: float) -> dict:
    c = harrell_c(cohort.time, cohort.event, oof["risk"])
    per_fold = [harrell_c(part["time"], part["event"], part["risk"]) for _, part in oof.groupby("fold")]
    from trainables.cross_validation import collapsed_folds

    collapsed = collapsed_folds(dict(enumerate(per_fold)), {k: float(p["risk"].std()) for k, p in oof.groupby("fold")})
    return {"oof C": round(c, 3), "imaging oracle C": round(oracle, 3),
            "share of oracle gain": round((c - 0.5) / (oracle - 0.5), 2),
            "r(DPI, true imaging lp)": round(float(np.corrcoef(oof["risk"], truth["lp_imaging"])[0, 1]), 2),
            "per-fold C": " / ".join(f"{v:.3f}" for v in per_fold) + (f" (fold {collapsed} learned nothing)"
                                                                      if collapsed else "")}


def attention(cohort, volumes, results, oof, top: int = 10) -> dict:
    from analysis.gradcam import attention_in_region, gradcam_map, untrained_twin

    store = cohort.store
    position = {pid: i for i, pid in enumerate(cohort.patient_ids)}
    scores = []
    for pid in oof["risk"].nlargest(top).index:
        slot, fold = int(cohort.slots[position[pid]]), int(oof.loc[pid, "fold"])
        network, image = results[fold].model.image_network, volumes[position[pid]].astype(np.float32)
        score = attention_in_region(gradcam_map(network, image), store.mask(slot), store.label(slot))
        twin = attention_in_region(gradcam_map(untrained_twin(network), image), store.mask(slot), store.label(slot))
        scores.append({**score, "enrichment, untrained twin": twin["enrichment"]})
    frame = pd.DataFrame(scores)
    return {k: round(float(frame[k].mean()), 2) for k in ("enrichment", "enrichment, untrained twin", "enrichment_axial",
                                                          "enrichment_coronal", "enrichment_sagittal", "hit",
                                                          "region_share")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[150, 300, 600])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the demo protocol's)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "learning.md")
    args = parser.parse_args(argv)
    import torch

    from datasets import Cohort
    from datasets.synthetic import SyntheticConfig, build_store
    from search_spaces import get_space
    from study.demo import DEMO_PREPROCESSING, DEMO_VOXEL_SIZE

    torch.set_num_threads(2)
    epochs = args.epochs or get_space("literature_priors").protocols["demo"].epochs
    started = time.perf_counter()
    rows, selection_rows, attention_rows = [], [], []
    header = ["# Learning the imaging signal: reference recipe at the CPU width vs cohort size", "", describe(), "",
              f"`python -m benchmarks.learning --sizes {' '.join(map(str, args.sizes))} --epochs {epochs} --folds "
              f"{args.folds}`: synthetic cohorts (demo generator and preprocessing, "
              f"{'x'.join(map(str, DEMO_PREPROCESSING.shape))} voxels), {args.folds}-fold CV, OS of all patients, "
              f"Cox head, {epochs} epochs, the demo protocol's reference recipe (`literature_priors`), predictions of "
              "the last epoch.", ""]

    def write() -> None:
        lines = [*header, markdown_table(pd.DataFrame(rows)), ""]
        if selection_rows:
            lines += ["## Which epoch: the last one, or the best on a 15 % selection split", "",
                      markdown_table(pd.DataFrame(selection_rows)), ""]
        if attention_rows:
            lines += ["## Grad-CAM on tumour + oedema (10 highest-DPI patients, largest cohort)", "",
                      "Enrichment: share of the map's mass inside tumour + oedema / the region's share of the head "
                      "(1 = uniform attention); per plane through the tumour; hit: the map's maximum in the region. "
                      "Control: the same network untrained (bright tumours draw its maps too).", "",
                      markdown_table(pd.DataFrame(attention_rows)), ""]
        lines.append(f"{time.perf_counter() - started:.0f} s in all.")
        write_result(args.out, lines)

    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"n{n}"
            store = build_store(root, SyntheticConfig(n=n, voxel_size=DEMO_VOXEL_SIZE, seed=args.seed),
                                DEMO_PREPROCESSING, workers=2)
            cohort = Cohort(store)
            volumes = cohort.store.images(cohort.slots)
            truth = pd.read_csv(root / "export" / "truth.csv").set_index("patient_id").loc[cohort.patient_ids]
            oracle = harrell_c(cohort.time, cohort.event, truth["lp_imaging"])
            best = None
            for backbone in args.backbones:
                t0 = time.perf_counter()
                config = recipe(backbone, epochs)
                oof, results = cross_validate(cohort, volumes, config, args.folds, args.seed, root / backbone)
                row = {"patients": n, "backbone": backbone, **summarise(cohort, truth, oof, oracle),
                       "seconds": round(time.perf_counter() - t0)}
                rows.append(row)
                write()
                if best is None or row["oof C"] > best[0]["oof C"]:
                    best = (row, config, oof, results)
            row, config, oof, results = best
            held_out = replace(config, selection_fraction=0.15)
            chosen, _ = cross_validate(cohort, volumes, held_out, args.folds, args.seed, root / "selection")
            selection_rows += [{"patients": n, "backbone": row["backbone"], "epoch": "last",
                                **{k: row[k] for k in ("oof C", "r(DPI, true imaging lp)", "per-fold C")}},
                               {"patients": n, "backbone": row["backbone"], "epoch": "best on 15 % selection split",
                                **{k: v for k, v in summarise(cohort, truth, chosen, oracle).items()
                                   if k in ("oof C", "r(DPI, true imaging lp)", "per-fold C")}}]
            if n == max(args.sizes):
                attention_rows.append({"patients": n, "backbone": row["backbone"], "oof C": row["oof C"],
                                       **attention(cohort, volumes, results, oof)})
            write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
