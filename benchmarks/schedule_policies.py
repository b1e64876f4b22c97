"""Which cell starts the next trial? The study's searcher and Ray's ASHA in a scheduling model.

    python -m benchmarks.schedule_policies [--seeds 20] [--gpus 24] [--configurations 20]

A discrete-event model of a study on a cluster, fast enough to repeat over many seeds: the
study's own `study.tuning.CellSearch` (per-cell Optuna TPE, per-cell caps, the cell order) and
Ray's own ASHA bracket (`ray.tune.schedulers.async_hyperband._Bracket`, one per cell) decide
which trials start and which stop; time is simulated. Trials are those of
`benchmarks.cluster_sim`: one report stands for 10 epochs (20 reports for 200 epochs), each
costs its backbone's and task's relative time (`report_cost`), and their C follows
`learning_curve` (best near lr 10^-3.5). A trial's start-up costs 0 report units (a real cluster,
where a trial's minutes of start-up are small against its hours of training) or 0.6 (about what
a trial start costs in `benchmarks.cluster_sim` on 2 cores at 5 s per report).

Compared: **taking turns** (round robin over the cells, the study's former policy) and **filling**
(cells in order of their task's patients, each up to its cap: the study's policy), with per-cell caps of 10 (the
default for 20 configurations, `per_cell_limit`) and 5. Reported per policy, as means over seeds:
- makespan / lower bound (the trials' summed time / GPUs) and GPU utilisation (its inverse);
- what TPE had seen: the cell's ended trials when it suggested its configurations 11 to 20;
- search quality: the noise-free C of the configuration each cell selects (its best finished
  trial by observed C), as a mean over cells, and its shortfall from the best reachable (0.70).
"""

from __future__ import annotations

import argparse
import heapq
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._machine import describe, markdown_table, write_result
from benchmarks.cluster_sim import BACKBONE_COST, TASK_COST, cell_costs, learning_curve, report_cost, study_config

ROOT = Path(__file__).resolve().parents[1]
BEST_REACHABLE = 0.70  # learning_curve's final C at its best learning rate, without noise


def true_cindex(lr: float) -> float:
    """`learning_curve`'s final C without its noise."""
    return 0.62 + 0.08 * math.exp(-((math.log10(lr) + 3.5) ** 2))


class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def taking_turns(search):
    """The former policy: after each suggestion, the cell that got it goes to the back of the order."""
    suggest = search.suggest

    def in_turn(trial_id):
        out = suggest(trial_id)
        if isinstance(out, dict):
            cell = search._trial_cells[trial_id]
            i = search._order.index(cell)
            search._order = search._order[i + 1:] + search._order[:i + 1]
        return out

    search.suggest = in_turn
    return search


def simulate(policy: str, cap: int, seed: int, gpus: int, configurations: int, startup: float) -> dict:
    """One study in simulated time; returns its schedule and search figures."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    from evaluation import metric_names as names
    from study.tuning import cell_search

    config = replace(study_config(f"sim{seed}", list(TASK_COST), list(BACKBONE_COST), configurations,
                                  Path("unused"), "unused", None), seed=seed, max_concurrent=gpus,
                     per_cell_concurrent=cap)
    search = cell_search(config, cell_costs(config))
    for s in search._searches.values():
        s.mirror = None  # no Optuna journal file
    if policy == "taking turns":
        taking_turns(search)
    protocol = config.protocol
    brackets = {cell.name: _Bracket(protocol.grace_epochs, protocol.epochs, protocol.reduction_factor, 0)
                for cell in config.cells()}
    events, busy, ended, seen, best, truth = [], 0.0, 0.0, [], {}, {}
    done = {cell: 0 for cell in brackets}
    counter = 0

    def start(now: float) -> bool:
        nonlocal counter
        trial_id = f"t{counter}"
        suggestion = search.suggest(trial_id)
        if not isinstance(suggestion, dict):
            return False
        counter += 1
        cell = search._trial_cells[trial_id]
        if search._suggested[cell] > 10:
            seen.append(done[cell])
        final, values = learning_curve(suggestion)
        truth[trial_id] = true_cindex(suggestion["lr"])
        heapq.heappush(events, (now + startup + report_cost(suggestion), counter, trial_id, cell, 1, now + startup,
                                final, values))
        return True

    while start(0.0):
        pass
    while events:
        now, order, trial_id, cell, step, began, final, values = heapq.heappop(events)
        value = values[step - 1]
        search.on_trial_result(trial_id, {names.EPOCH_CINDEX.name: value, "training_iteration": step})
        stopped = step >= protocol.epochs or brackets[cell].on_result(_Trial(trial_id), step, value) == "STOP"
        if not stopped:
            heapq.heappush(events, (now + (now - began) / step, order, trial_id, cell, step + 1, began, final, values))
            continue
        busy += now - began
        ended = max(ended, now)
        done[cell] += 1
        finished = step >= protocol.epochs
        if finished and final > best.get(cell, (0.0, 0.0))[0]:
            best[cell] = (final, truth[trial_id])
        search.on_trial_complete(trial_id, {names.EPOCH_CINDEX.name: value, names.OOF_CINDEX.name: final,
                                            names.FINAL: True} if finished else {names.EPOCH_CINDEX.name: value})
        while start(now):
            pass
    return {"makespan / bound": ended * gpus / busy, "seen": float(np.mean(seen)),
            "selected C": float(np.mean([true for _, true in best.values()]))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.schedule_policies",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--gpus", type=int, default=24)
    parser.add_argument("--configurations", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "schedule_policies.md")
    args = parser.parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    started = time.perf_counter()
    rows = []
    for policy, cap in (("taking turns", 10), ("filling", 10), ("filling", 5)):
        for startup in (0.0, 0.6):
            runs = pd.DataFrame([simulate(policy, cap, seed, args.gpus, args.configurations, startup)
                                 for seed in range(args.seeds)])
            ratio = runs["makespan / bound"].mean()
            rows.append({"policy": policy, "per-cell cap": cap, "start-up (report units)": startup,
                         "makespan / bound": round(ratio, 3), "GPU utilisation": f"{1 / ratio:.0%}",
                         "trials ended when TPE suggests 11-20": round(runs["seen"].mean(), 1),
                         "selected configuration's true C": round(runs["selected C"].mean(), 4),
                         "shortfall": round(BEST_REACHABLE - runs["selected C"].mean(), 4)})
            print(rows[-1], flush=True)
    lines = ["# Scheduling policies: which cell starts the next trial", "", describe(), "",
             f"`python -m benchmarks.schedule_policies --seeds {args.seeds} --gpus {args.gpus} --configurations "
             f"{args.configurations}`: 12 cells (3 backbones x 4 tasks, glioblastoma-only tasks 0.45x as long) x "
             f"{args.configurations} configurations, `literature_priors`' full protocol (200 epochs in 20 reports, "
             f"ASHA grace 20, factor 3), {args.gpus} GPUs; means over {args.seeds} seeds (see the module docstring).",
             "", markdown_table(pd.DataFrame(rows), floatfmt=".3f"), "",
             f"{time.perf_counter() - started:.0f} s in all."]
    write_result(args.out, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
