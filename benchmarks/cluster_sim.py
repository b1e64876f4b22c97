"""Does a study keep a cluster's GPUs busy? The study's real driver on a simulated cluster.

    python -m benchmarks.cluster_sim [--nodes 3] [--gpus-per-node 8] [--configurations 20]
                                     [--seconds-per-unit 1.0]

A local Ray cluster (`ray.cluster_utils.Cluster`: a head that takes no trials and N worker
nodes declaring G logical GPUs each; nothing needs a real GPU) runs the study's own
`study.tuning.run_trials`: its per-cell Optuna searches, per-cell ASHA, concurrency limits and
MLflow tracking, with each trial replaced by a stand-in (`stand_in_trial`) that sleeps as a cost
model says and reports a synthetic learning curve whose final C depends on the learning rate
(so TPE and ASHA have something to act on).

Study shape: `literature_priors`' full protocol, 12 cells (3 backbones x 4 tasks) x 20
configurations x 10 folds x 200 epochs, ASHA grace 20 and reduction factor 3, one GPU per trial.
One report stands for 10 epochs (so 20 reports for a full trial; the rungs at epochs 20, 60, 180
are reports 2, 6, 18): the driver's per-report work stays what a real study's is relative to
its trials. Time per report: `--seconds-per-unit` x the backbone's relative cost per epoch
(SE-ResNeXt50 1.0, ResNet50-CBAM 1.15, DenseNet-121 0.9, the ratios of their forward FLOPs in
`benchmarks/results/cpu_compute.md`), x 0.45 for the glioblastoma-only tasks (about 480 of 1,100
patients).

Two schedules on the same simulated cluster: **sequential** (one cell after another, as the
study used to run) and **concurrent** (every cell's search in one Tuner, `study.tuning`).
Reported: makespan against the lower bound (the trials' summed time / GPU slots), GPU-slot
utilisation (the trials' summed time / (slots x makespan)), and trials at once over time (PNG).
On this 2-core machine every trial start (a fresh Ray actor) costs seconds of CPU that a real
cluster's nodes spend in parallel, so the simulation is pessimistic about start-up.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._machine import describe, markdown_table, write_result

ROOT = Path(__file__).resolve().parents[1]
EPOCHS_PER_REPORT = 10
BACKBONE_COST = {"seresnext50": 1.0, "resnet50_cbam": 1.15, "densenet121": 0.9}
TASK_COST = {"os_all": 1.0, "1yr_all": 1.0, "os_gbm": 0.45, "1yr_gbm": 0.45}


def report_cost(config: dict) -> float:
    """Relative time of one report of a trial: its backbone's cost per epoch x its task's patients."""
    return BACKBONE_COST[config["backbone"]] * TASK_COST[config["task"]]


def cell_costs(config) -> dict[str, float]:
    """What the study's driver orders cells by: the patients of each cell's task (relative)."""
    return {cell.name: TASK_COST[cell.task] for cell in config.cells()}


def learning_curve(config: dict) -> tuple[float, list[float]]:
    """A trial's final C and its value at each report: best near lr 10^-3.5, noisy, deterministic."""
    rng = np.random.default_rng(zlib.crc32(repr((config["task"], config["backbone"], config["lr"])).encode()))
    final = 0.62 + 0.08 * math.exp(-((math.log10(config["lr"]) + 3.5) ** 2)) + rng.normal(0, 0.01)
    return final, [0.5 + (final - 0.5) * (1 - math.exp(-step / 4)) + rng.normal(0, 0.005)
                   for step in range(1, config["epochs"] + 1)]


def stand_in_trial(config: dict, seconds_per_unit: float) -> None:
    """Sleeps as the cost model says and reports a synthetic learning curve (see module doc)."""
    from ray import tune

    from evaluation import metric_names as names

    seconds = seconds_per_unit * report_cost(config)
    final, values = learning_curve(config)
    reports = config["epochs"]
    for step, value in enumerate(values, start=1):
        time.sleep(seconds)
        # "epoch" in real epochs (the pruning messages read as a real study's); fold-epochs in the
        # protocol's units (one report = one of its epochs x 10 folds), as the progress lines count them.
        result = {"epoch": step * EPOCHS_PER_REPORT, names.EPOCH_CINDEX.name: value,
                  names.FOLD_EPOCHS.name: step * 10}
        if step == reports:
            result.update({names.FINAL: True, names.OOF_CINDEX.name: final, names.OOF_CINDEX_LOW.name: final - 0.03,
                           names.OOF_CINDEX_HIGH.name: final + 0.03})
        tune.report(result)


def study_config(name: str, tasks, backbones, configurations: int, storage: Path, tracking: str, address: str):
    from search_spaces import SPACES, get_space
    from study.config import StudyConfig

    space = get_space("literature_priors")
    full = space.protocols["full"]
    protocol = replace(full, epochs=200 // EPOCHS_PER_REPORT, grace_epochs=full.grace_epochs // EPOCHS_PER_REPORT,
                       fixed={}, checkpoint_every=1)
    SPACES["cluster_sim"] = replace(space, name="cluster_sim", protocols={"full": protocol, "demo": protocol})
    return StudyConfig(space="cluster_sim", budget="full", data=None, external=(), backbones=tuple(backbones),
                       tasks=tuple(tasks), num_samples=configurations, max_concurrent=None, cpus_per_trial=1,
                       gpus_per_trial=1.0, address=address, tracking_uri=tracking, storage_path=str(storage),
                       name=name, inputs=("image",))


def run_schedule(cells, configurations, root: Path, address: str, seconds_per_unit: float, label: str):
    """Trial intervals (start, end) of one schedule: all cells in one Tuner, or one Tuner per cell."""
    from ray import tune

    from study.preflight import node_shapes, trial_slots
    from study.tracking import StudyTracker
    from study.tuning import run_trials

    intervals = []
    started = time.time()
    for k, group in enumerate(cells):
        tasks = sorted({t for _, t in group}, key=list(TASK_COST).index)
        backbones = sorted({b for b, _ in group}, key=list(BACKBONE_COST).index)
        config = study_config(f"{label}{k}", tasks, backbones, configurations, root / "ray",
                              f"sqlite:///{root / 'mlflow.db'}", address)
        config = replace(config, max_concurrent=trial_slots(config, node_shapes()[0]))
        tracker = StudyTracker(config.tracking_uri, config.name, root / f"{config.name}.jsonl")
        tracker.start({"space": config.space}, {"cells": len(group)}, {})
        trial = tune.with_parameters(stand_in_trial, seconds_per_unit=seconds_per_unit)
        grid = run_trials(config, None, tracker, trial, cell_costs=cell_costs(config))
        tracker.finish_parent("FINISHED", {})
        tracker.catch_up(30)
        for result in grid:
            metrics = result.metrics or {}
            if "timestamp" in metrics and "time_total_s" in metrics:
                end = float(metrics["timestamp"])
                intervals.append((end - float(metrics["time_total_s"]), end))
    return intervals, started, time.time()


def summarise(intervals, started: float, ended: float, slots: int, label: str) -> dict:
    busy = sum(e - s for s, e in intervals)
    makespan = ended - started
    bound = busy / slots
    return {"schedule": label, "trials": len(intervals), "trial time (s)": round(busy),
            "makespan (s)": round(makespan), "lower bound (s)": round(bound),
            "makespan / bound": round(makespan / bound, 2), "GPU-slot utilisation": f"{busy / (slots * makespan):.0%}"}


def concurrency(intervals, started: float, ended: float, step: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    times = np.arange(0, ended - started + step, step)
    running = np.array([sum(s - started <= t < e - started for s, e in intervals) for t in times])
    return times, running


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--configurations", type=int, default=20)
    parser.add_argument("--seconds-per-unit", type=float, default=1.0,
                        help="seconds of one report (10 epochs of 10 folds) of SE-ResNeXt50 on all patients")
    parser.add_argument("--schedules", nargs="+", default=["concurrent", "sequential"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cluster_sim.md")
    args = parser.parse_args(argv)
    import logging
    import os

    import optuna
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    cells = [(b, t) for t in TASK_COST for b in BACKBONE_COST]
    slots = args.nodes * args.gpus_per_node
    rows, curves = [], {}
    started_all = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0})
    try:
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=args.gpus_per_node, num_gpus=args.gpus_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        for label in args.schedules:
            with tempfile.TemporaryDirectory() as tmp:
                groups = [cells] if label == "concurrent" else [[cell] for cell in cells]
                intervals, started, ended = run_schedule(groups, args.configurations, Path(tmp), cluster.address,
                                                         args.seconds_per_unit, label)
            rows.append(summarise(intervals, started, ended, slots, label))
            curves[label] = concurrency(intervals, started, ended)
            print(rows[-1], flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.5))
    for label, (times, running) in curves.items():
        axis.step(times, running, where="post", label=label)
    axis.axhline(slots, color="grey", linestyle=":", label=f"{slots} GPU slots")
    axis.set_xlabel("seconds since the study started")
    axis.set_ylabel("trials running")
    axis.legend()
    axis.set_title(f"{len(cells)} cells x {args.configurations} configurations on "
                   f"{args.nodes} x {args.gpus_per_node} GPUs")
    figure.tight_layout()
    png = args.out.with_suffix(".png")
    figure.savefig(png, dpi=110)
    concurrent = next((r for r in rows if r["schedule"] == "concurrent"), None)
    verdict = ""
    if concurrent:
        utilisation = float(concurrent["GPU-slot utilisation"].rstrip("%")) / 100
        verdict = (f"Targets (concurrent): utilisation >= 90%: {'met' if utilisation >= 0.9 else 'not met'} "
                   f"({concurrent['GPU-slot utilisation']}); makespan <= 1.25 x the lower bound: "
                   f"{'met' if concurrent['makespan / bound'] <= 1.25 else 'not met'} "
                   f"({concurrent['makespan / bound']}x).")
    lines = ["# Cluster simulation: sequential vs concurrent cells", "", describe(), "",
             f"`python -m benchmarks.cluster_sim --nodes {args.nodes} --gpus-per-node {args.gpus_per_node} "
             f"--configurations {args.configurations} --seconds-per-unit {args.seconds_per_unit:g}`: "
             f"{len(cells)} cells x {args.configurations} configurations, 10 folds x 200 epochs with ASHA (grace 20, "
             f"factor 3), one GPU per trial, on {args.nodes} simulated nodes x {args.gpus_per_node} GPUs "
             f"({slots} slots); stand-in trials (see the module docstring).", "",
             markdown_table(pd.DataFrame(rows)), "", verdict, "", f"![trials at once]({png.name})", "",
             f"{time.perf_counter() - started_all:.0f} s in all."]
    write_result(args.out, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
