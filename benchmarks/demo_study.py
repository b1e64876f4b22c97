"""Wall time of the demo study, where it goes, and the best CV C-index it reaches next to the demo
cohort's oracle C-index (the true linear predictor of its hazard model).

    python -m benchmarks.demo_study [--space literature_priors] [--out benchmarks/results/demo_study.md]

Builds the demo cohort once in a fresh cache (timed: the conversion), then runs
``python -m study.run --space SPACE`` exactly as a user would (fresh tracking store and storage in
a temporary folder) and splits its wall time with the study's ``timings.json``: data, start-up
(Ray, MLflow), trials (Tune), of which training and validation inside the trials, tracking, and
the rest (Tune's scheduling, searcher, checkpoint handling, process start of trial actors). The
per-trial and per-report overheads give an estimate for the full-size protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks._machine import describe, write_result
from study.demo import demo_store

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", default="literature_priors")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_study.md")
    parser.add_argument("--full-trial-hours", type=float, default=2.0,
                        help="assumed GPU time of one full-size trial (10 folds x 200 epochs) for the estimate")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["GLIOMA_STUDY_CACHE"] = cache
        started = time.perf_counter()
        demo_store(progress=False)
        conversion = time.perf_counter() - started
    del os.environ["GLIOMA_STUDY_CACHE"]
    demo_store(progress=False)  # the user's cache, outside the timed study
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        process = subprocess.run([sys.executable, "-m", "study.run", "--space", args.space, "--name", "bench"],
                                 cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if process.returncode != 0:
            print(process.stdout[-3000:], process.stderr[-3000:])
            return 1
        table = pd.read_csv(Path(tmp) / "ray_results" / "bench" / "results.csv", index_col=0)
        timings = json.loads((Path(tmp) / "ray_results" / "bench" / "timings.json").read_text())
        trials = sum(int(v.split("/")[0]) + int(v.split("/")[1]) + int(v.split("/")[2])
                     for v in table.loc["trials (finished/pruned/failed)"])
    lines = [f"# Demo study: `python -m study.run --space {args.space}`", "", describe(),
             f"- wall time (cohort cache already built): {wall:.0f} s", "",
             "The study's own results table (rows as printed by the study; the oracle is the C-index of the "
             "cohort's true imaging / total linear predictor on the same patients):", "",
             "| cell | " + " | ".join(table.index) + " |", "|---|" + "---|" * len(table.index)]
    for column in table.columns:
        lines.append(f"| {column} | " + " | ".join(str(v) for v in table[column]) + " |")
    concurrency = max(1, (os.cpu_count() or 1))
    rest = timings["tune_s"] - timings["trial_train_s"] / concurrency - timings["tracking_s"]
    per_trial = (timings["startup_s"] / max(1, trials) + rest * concurrency / max(1, trials)
                 + timings["tracking_s"] / max(1, trials))
    per_report = timings["tracking_s"] / max(1, timings["trial_reports"])
    full_trial_s = args.full_trial_hours * 3600
    full_overhead = (per_trial + 200 * per_report) / full_trial_s
    lines += ["", "## Where the time goes", "",
              "| part | seconds | share of wall time |", "|---|---:|---:|",
              f"| demo cohort conversion (first run only; 150 patients, synthesis + conversion) | {conversion:.0f} | - |"]
    wall_s = timings["wall_s"]
    for label, value in (("data (open store, read volumes)", timings["data_s"]),
                         ("start-up (Ray, MLflow parent run)", timings["startup_s"]),
                         (f"training + validation inside trials (trial time / {concurrency} concurrent)",
                          timings["trial_train_s"] / concurrency),
                         ("tracking (MLflow writes)", timings["tracking_s"]),
                         ("trial start-up and Tune bookkeeping (trial process start and imports, model build, scheduling, searcher, checkpoints)", rest)):
        lines.append(f"| {label} | {value:.1f} | {value / wall_s:.0%} |")
    lines += [f"| wall time | {wall_s:.0f} | 100% |", "",
              f"{trials} trials, {timings['trial_reports']} epoch reports. Overhead per trial (start-up, "
              f"bookkeeping and tracking shared out): {per_trial:.1f} s; tracking per report {per_report * 1000:.0f} ms.",
              f"A full-size trial (10 folds x 200 epochs of ~1,000 volumes) takes about {args.full_trial_hours:g} GPU-hours "
              f"(assumed: 2 million volume passes at about 300 volumes/s; --full-trial-hours); with 200 reports its Tune + MLflow overhead would be "
              f"{per_trial + 200 * per_report:.0f} s, **{full_overhead:.2%} of its wall time** (target: under 10%); "
              f"the demo's own trials, which last seconds, spend "
              f"{1 - timings['trial_train_s'] / concurrency / wall_s:.0%} "
              "of the wall time outside training.", ""]
    from search_spaces import get_space

    protocol = get_space(args.space).protocols["demo"]
    searched = ", ".join(f"{n} configurations in {label}" for label, n in protocol.cell_samples.items())
    lines += ["", f"The demo budget ({protocol.folds} folds, {protocol.epochs} epochs, width {protocol.width:g} networks, "
              f"{protocol.num_samples} configuration per cell" + (f" but {searched}, ASHA at epoch "
                                                                  f"{protocol.grace_epochs}" if searched else "")
              + ") is sized to finish on a 2-core CPU without AVX-512 in under 10 minutes.", ""]
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
