"""What the study's search buys: its default against the alternatives, where the truth is known.

    python -m benchmarks.search_quality [--dev 300] [--test 2000] [--epochs 30] [--folds 2] [--seeds 20]

One cell (OS, all patients, DenseNet-121 at the CPU width) on a synthetic development cohort of
`--dev` patients, and an independent test cohort of `--test` patients from the same generator (the
demo's, at the demo's 32 x 32 x 24 voxels), so that every configuration's real skill is its
C-index on the test cohort.

The space has a real optimum inside it: learning rate 1e-3 (too slow for the budget), 3e-3 or
1e-2; batch 8 or 16; augmentation 0.5 or 1.5; regularisation none (weight decay 1e-6, dropout 0)
or strong (weight decay 1e-3, dropout 0.3): 24 configurations, the reference recipe among them
(1e-2, 16, 1.5, none: the demo's). Each is trained once, for `--epochs` epochs of `--folds`-fold CV
(the study's own `trainables.CrossValidation`), and every epoch is recorded: the mean of the folds'
validation C-indices (what the study reports to ASHA), the rung scores (what the headline replays)
and, at the end, the pooled out-of-fold predictions and the fold ensemble's C-index on the test
cohort. The searches are then replayed on this table, `--seeds` times each (the configurations a
search draws differ per seed; training noise is the table's, the same for every search):

- the reference recipe alone;
- random search over the grid without pruning (Ray Tune's default) and with ASHA;
- TPE (Optuna's, as the study configures it: 10 random start-up trials) without pruning and with
  ASHA, the reference first: the study's default;
- the exhaustive grid: the best there was to find.

ASHA is Ray's own rule (`ray.tune.schedulers.async_hyperband._Bracket`), grace 3 epochs (a tenth of
the budget) and reduction factor 3, as the full protocol's 20 of 200 epochs and factor 3, with 2
trials at once in a discrete-event run. Every search gets the same compute (fold-epochs); the
selected configuration is the finished one with the best pooled out-of-fold C-index, as in the
study. Reported per search: the selected configuration's test C-index (its real skill), the
study's headline for it (`evaluation.selection.bbc_search`, BBC-CV replaying ASHA), the naive
out-of-fold C of the selected configuration, the gaps, and the curve of test C against compute.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation import metric_names as names
from evaluation.metrics import harrell_c
from benchmarks._machine import describe, markdown_table, write_result

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "densenet121"
GRID = {"lr": (1e-3, 3e-3, 1e-2), "batch_size": (8, 16), "augmentation": (0.5, 1.5),
        "regularisation": ("none", "strong")}
REGULARISATION = {"none": {"weight_decay": 1e-6, "dropout": 0.0}, "strong": {"weight_decay": 1e-3, "dropout": 0.3}}
REFERENCE = {"lr": 1e-2, "batch_size": 16, "augmentation": 1.5, "regularisation": "none"}
GRACE, REDUCTION, AT_ONCE = 3, 3, 2
METHODS = ("reference recipe", "random", "random + ASHA", "TPE", "TPE + ASHA, reference first (default)", "grid")
# Variants that say where the default's differences come from (`--variants`).
VARIANTS = ("random + ASHA, reference first", "TPE + ASHA", "TPE (5 start-up trials) + ASHA, reference first")


def configurations() -> list[dict]:
    return [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]


def key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


# -- the table: every configuration trained once -------------------------------------------------

def train_one(task: tuple) -> dict:
    """Train one configuration (in a worker process): its per-epoch curve and rung scores, final
    out-of-fold risk and the fold ensemble's test C-index."""
    config, dev_store, test_store, epochs, folds, seed, work = task
    import torch

    from trainables.ensemble import predict_ensemble
    from datasets import Cohort
    from search_spaces import get_space
    from trainables.config import TrainConfig
    from trainables.cross_validation import CohortArrays, CrossValidation

    torch.set_num_threads(1)
    protocol = get_space("literature_priors").protocols["demo"]
    train = TrainConfig(backbone=BACKBONE, head="cox", width=protocol.width, depth=protocol.depth, epochs=epochs,
                        lr=config["lr"], batch_size=config["batch_size"], augmentation=config["augmentation"],
                        optimizer="adamw", seed=seed, **REGULARISATION[config["regularisation"]], **protocol.fixed)
    cohort = Cohort(dev_store)
    started = time.perf_counter()
    cv = CrossValidation(CohortArrays(cohort, cohort.store.images(cohort.slots)), cohort.folds(folds, seed), train,
                         Path(work))
    curve, rungs = [], {}
    while not cv.finished:
        metrics = cv.step()
        curve.append(float(metrics[names.EPOCH_CINDEX.name]))
        scores = cv.rung_scores().set_index("patient_id").loc[cohort.patient_ids]
        rungs[cv.epoch] = (scores["fold"].to_numpy().tolist(), scores["score"].to_numpy().tolist())
    results = cv.results()
    oof = pd.concat([r.predictions for r in results]).set_index("patient_id").loc[cohort.patient_ids]
    test = Cohort(test_store)
    risk = predict_ensemble([r.model for r in results], test.store.images(test.slots), (365.0,))["risk"]
    return {"config": config, "curve": curve, "rungs": rungs, "final": oof["risk"].to_numpy().tolist(),
            "oof_c": harrell_c(cohort.time, cohort.event, oof["risk"].to_numpy()),
            "test_c": harrell_c(test.time, test.event, risk), "seconds": time.perf_counter() - started}


def build_table(args, dev_store: Path, test_store: Path, work: Path) -> list[dict]:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    tasks = [(c, str(dev_store), str(test_store), args.epochs, args.folds, args.seed, str(work / f"c{i}"))
             for i, c in enumerate(configurations())]
    rows = []
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        for row in pool.map(train_one, tasks):
            rows.append(row)
            print(f"  {key(row['config'])}: oof C {row['oof_c']:.3f}, test C {row['test_c']:.3f}, "
                  f"{row['seconds']:.0f} s", flush=True)
    return rows


# -- the searches, replayed on the table ----------------------------------------------------------

class _Id:
    def __init__(self, n: int):
        self.trial_id = str(n)


def replay(table: dict[str, dict], method: str, seed: int, budget: float, epochs: int, folds: int) -> list[dict]:
    """One search under `budget` fold-epochs: every trial it ran, in order, with what it cost, when
    it ended (clock in fold-epochs of the 2 slots), whether it finished, its rung scores as seen."""
    import optuna
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    from study.tuning import TPE_STARTUP_TRIALS

    rng = np.random.default_rng(seed)
    keys = list(table)
    pruning = "ASHA" in method
    if method == "reference recipe":
        suggest = iter([key(REFERENCE)]).__next__
    elif method == "grid":
        suggest = iter(keys).__next__
    elif method.startswith("random"):  # uniform draws from the grid, with repeats, as Tune's random search
        first = [key(REFERENCE)] if "reference first" in method else []

        def suggest() -> str:
            return first.pop() if first else keys[int(rng.integers(len(keys)))]
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=5 if "5 start-up" in method else TPE_STARTUP_TRIALS))
        distributions = {name: optuna.distributions.CategoricalDistribution(values) for name, values in GRID.items()}
        if "reference first" in method:
            study.enqueue_trial(REFERENCE)
        asked: dict[int, optuna.trial.Trial] = {}

        def suggest() -> str:
            trial = study.ask(distributions)
            asked[len(asked)] = trial
            return key(trial.params)

    bracket = _Bracket(GRACE, epochs, REDUCTION, 0) if pruning else None
    rung_epochs = sorted(m for m, _ in bracket._rungs) if pruning else []
    trials: list[dict] = []
    events: list = []
    spent, running = 0.0, 0

    def start(now: float) -> bool:
        nonlocal running
        if spent + sum(t["planned"] for t in trials if t["open"]) + epochs * folds > budget:
            return False  # a trial that could run to its end must fit the budget
        try:
            k = suggest()
        except StopIteration:
            return False
        n = len(trials)
        trials.append({"key": k, "n": n, "open": True, "planned": epochs * folds, "finished": False, "rungs": {},
                       "reported": {}, "cost": 0.0, "end": None, "start": now})
        for epoch in rung_epochs:
            heapq.heappush(events, (now + epoch * folds, n, epoch))
        heapq.heappush(events, (now + epochs * folds, n, epochs))
        running += 1
        return True

    def tell(trial: dict, value: float, pruned: bool, last_epoch: int) -> None:
        if method.startswith("TPE"):  # as the study's searcher: every epoch's value, then the outcome
            ot = asked[trial["n"]]
            for epoch, c in enumerate(table[trial["key"]]["curve"][:last_epoch], start=1):
                ot.report(c, epoch)
            study.tell(ot, None if pruned else value,
                       state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE)

    for _ in range(AT_ONCE):
        start(0.0)
    while events:
        clock, n, epoch = heapq.heappop(events)
        trial = trials[n]
        if not trial["open"]:
            continue
        row = table[trial["key"]]
        c = row["curve"][epoch - 1]
        stop = False
        if epoch < epochs:
            fold, score = row["rungs"][epoch]
            trial["rungs"][epoch] = (np.asarray(fold), np.asarray(score))
            trial["reported"][epoch] = clock
            stop = bracket.on_result(_Id(n), epoch, c) == TrialScheduler.STOP
            if not stop:
                continue
        trial.update(open=False, finished=not stop, cost=epoch * folds, end=clock)
        spent += epoch * folds
        running -= 1
        tell(trial, row["oof_c"], stop, epoch)
        while running < AT_ONCE and start(clock):
            pass
    return trials


def selected_at(trials: list[dict], table: dict, until: float) -> str | None:
    """The study's choice among the trials finished by `until` (clock): the best pooled OOF C."""
    done = [t for t in trials if t["finished"] and t["end"] <= until]
    return max(done, key=lambda t: table[t["key"]]["oof_c"])["key"] if done else None


def headline(trials: list[dict], table: dict, time_, event, epochs: int, seed: int, pruning: bool) -> float:
    """The study's headline of the search: BBC-CV replaying ASHA with pruning (`study.headline`),
    BBC-CV over the finished configurations without."""
    from evaluation.selection import SearchedTrial, bbc_cv, bbc_search

    if not pruning:
        risks = np.array([table[t["key"]]["final"] for t in trials if t["finished"]])
        return bbc_cv(time_, event, risks, n_bootstrap=300, seed=seed).value
    searched = [SearchedTrial(np.asarray(table[t["key"]]["final"]) if t["finished"] else None, t["rungs"],
                              t["reported"]) for t in trials]
    return bbc_search(time_, event, searched, grace=GRACE, max_t=epochs, reduction_factor=REDUCTION,
                      n_bootstrap=300, seed=seed).value


def evaluate(table: dict, time_, event, args, methods) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per method and seed: the final selection's numbers; and the curve of test C against compute."""
    full = args.epochs * args.folds
    budget = args.budget_configs * full
    grid_best = max(r["test_c"] for r in table.values())
    rows, curves = [], []
    checkpoints = np.linspace(full / 2, len(table) * full, 60)
    for method in methods:
        for seed in range(1 if method in ("reference recipe", "grid") else args.seeds):
            trials = replay(table, method, seed, len(table) * full if method == "grid" else budget, args.epochs,
                            args.folds)
            for point in checkpoints:
                chosen = selected_at(trials, table, point)
                spent = sum(min(t["cost"] if t["end"] is not None and t["end"] <= point else
                                max(0.0, point - t["start"]), t["planned"]) for t in trials) if trials else 0.0
                curves.append({"method": method, "seed": seed, "clock": point, "compute": spent,
                               "test_c": table[chosen]["test_c"] if chosen else np.nan})
            chosen = selected_at(trials, table, np.inf)
            row = table[chosen]
            rows.append({"method": method, "seed": seed, "trials": len(trials),
                         "finished": sum(t["finished"] for t in trials),
                         "compute": sum(t["cost"] for t in trials), "test_c": row["test_c"],
                         "headline": headline(trials, table, time_, event, args.epochs, seed, "ASHA" in method),
                         "oof_c": row["oof_c"], "regret": grid_best - row["test_c"], "chosen": chosen})
    return pd.DataFrame(rows), pd.DataFrame(curves)


def compute_to_reach(curves: pd.DataFrame, method: str, target: float) -> tuple[float, float]:
    """(median over replays of the compute at which the selection first reaches `target` test C,
    inf where more than half never do; share of replays that reach it)."""
    out = []
    for _, part in curves[curves["method"] == method].groupby("seed"):
        hit = part[part["test_c"] >= target - 1e-12]
        out.append(float(hit["compute"].iloc[0]) if len(hit) else np.inf)
    return float(np.median(out)), float(np.mean(np.isfinite(out)))


def plot(curves: pd.DataFrame, frame: pd.DataFrame, grid_best: float, path: Path, full: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for method in METHODS:
        if method in ("reference recipe", "grid"):  # one configuration, or all of them: a point each
            final = frame[frame["method"] == method]
            ax.plot(final["compute"] / full, final["test_c"], "o", label=f"{method} ({final['trials'].iloc[0]} "
                    f"configuration{'s' if final['trials'].iloc[0] > 1 else ''})")
            continue
        part = curves[curves["method"] == method]
        mean = part.groupby("clock")[["compute", "test_c"]].mean()
        ax.plot(mean["compute"] / full, mean["test_c"], label=f"{method}, mean of {part['seed'].nunique()} replays",
                lw=2.2 if "default" in method else 1.2)
    ax.axhline(grid_best, color="grey", ls="--", lw=0.8, label="best configuration of the grid")
    ax.set(xlabel="compute spent (full configurations' worth of fold-epochs)",
           ylabel="test C-index of the selected configuration", title="What each search finds per unit of compute")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dev", type=int, default=300, help="development cohort patients")
    parser.add_argument("--test", type=int, default=2000, help="test cohort patients")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=40, help="replays of each search")
    parser.add_argument("--budget-configs", type=int, default=8,
                        help="each search's compute, in full configurations' worth of fold-epochs")
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                        help="also replay the variants that say where the default's differences come from")
    parser.add_argument("--workers", type=int, default=2, help="configurations trained at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", type=Path, default=None, help="reuse (or write) the trained table here (JSON)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "search_quality.md")
    args = parser.parse_args(argv)
    from datasets import Cohort
    from datasets.synthetic import SyntheticConfig, build_store
    from study.demo import DEMO_PREPROCESSING, DEMO_VOXEL_SIZE

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dev = build_store(tmp / "dev", SyntheticConfig(n=args.dev, voxel_size=DEMO_VOXEL_SIZE, seed=args.seed),
                          DEMO_PREPROCESSING, workers=args.workers)
        reused = bool(args.table and args.table.exists())
        if reused:
            rows = json.loads(args.table.read_text())
        else:
            test = build_store(tmp / "test", SyntheticConfig(n=args.test, voxel_size=DEMO_VOXEL_SIZE,
                                                             seed=args.seed + 1000), DEMO_PREPROCESSING,
                               workers=args.workers)
            print(f"cohorts ready in {time.perf_counter() - started:.0f} s; training {len(configurations())} "
                  "configurations", flush=True)
            rows = build_table(args, dev, test, tmp / "work")
            if args.table:
                args.table.write_text(json.dumps(rows))
        cohort = Cohort(dev)
        time_, event = cohort.time, cohort.event
    table = {key(r["config"]): r for r in rows}
    for r in table.values():
        r["rungs"] = {int(e): v for e, v in r["rungs"].items()}
    methods = METHODS + (VARIANTS if args.variants else ())
    frame, curves = evaluate(table, time_, event, args, methods)
    full = args.epochs * args.folds
    grid_best = max(r["test_c"] for r in table.values())
    summary = []
    for method in methods:
        part = frame[frame["method"] == method]
        reach, reached = compute_to_reach(curves, method, grid_best - 0.01)
        summary.append({
            "search": method, "replays": len(part), "trials run": f"{part['trials'].mean():.1f}",
            "finished": f"{part['finished'].mean():.1f}", "compute (configurations)": f"{part['compute'].mean() / full:.1f}",
            "test C of the selected": f"{part['test_c'].mean():.3f}",
            "regret vs the grid's best": f"{part['regret'].mean():.3f}",
            "within 0.01 of the grid's best": f"{(part['regret'] <= 0.01).mean():.0%}",
            "headline (BBC-CV replaying ASHA)": f"{part['headline'].mean():.3f}",
            "headline - test C": f"{(part['headline'] - part['test_c']).mean():+.3f}",
            "naive OOF C - test C": f"{(part['oof_c'] - part['test_c']).mean():+.3f}",
            "compute to reach grid best - 0.01 (median)": "-" if not np.isfinite(reach) else f"{reach / full:.1f}",
            "replays that reach it": f"{reached:.0%}"})
    grid_rows = sorted(table.values(), key=lambda r: -r["test_c"])
    mean = frame.groupby("method")["test_c"].mean()
    regret = frame.groupby("method")["regret"].mean()
    gap = (frame["headline"] - frame["test_c"]).groupby(frame["method"]).mean()
    default = "TPE + ASHA, reference first (default)"
    findings = [
        f"- ASHA: the selected configuration's test C {mean['random']:.3f} -> {mean['random + ASHA']:.3f} for random "
        f"search, {mean['TPE']:.3f} -> " + (f"{mean['TPE + ASHA']:.3f} for TPE (both without the reference first), "
                                             if "TPE + ASHA" in mean else "")
        + f"at equal or less compute: pruning at a tenth of the budget lets a search try "
          f"{frame[frame['method'] == 'random + ASHA']['trials'].mean():.0f} configurations instead of "
          f"{args.budget_configs}.",
        f"- The study's default: regret {regret[default]:.3f} against the grid's best (goal: within 0.01), its "
        f"headline {gap[default]:+.3f} from its test C (goal: within 0.01; conservative, as BBC-CV is).",
    ]
    if "random + ASHA, reference first" in mean and "TPE + ASHA" in mean:
        findings.append(f"- The reference recipe first (always evaluated to its end, the results table's comparison) "
                        f"costs {mean['random + ASHA'] - mean['random + ASHA, reference first']:.3f} of test C with "
                        f"random search and {mean['TPE + ASHA'] - mean[default]:.3f} with TPE; TPE and random search "
                        f"under ASHA differ by {mean['TPE + ASHA'] - mean['random + ASHA']:+.3f} on this space of 24 "
                        "configurations, where a random third of the space already holds a near-best one.")
    plot(curves, frame, grid_best, args.out.with_suffix(".png"), full)
    lines = ["# Search quality: the study's search against random search and a grid, on a test cohort", "",
             describe(), "",
             f"Command: `python -m benchmarks.search_quality --dev {args.dev} --test {args.test} --epochs {args.epochs} "
             f"--folds {args.folds} --seeds {args.seeds} --budget-configs {args.budget_configs}`", "",
             f"Development cohort {args.dev} patients, test cohort {args.test} (independent, same generator); "
             f"{BACKBONE} at the CPU width, OS of all patients, Cox head, {args.folds}-fold CV, {args.epochs} epochs; "
             f"{len(table)} configurations (the module docstring); each search's budget "
             f"{args.budget_configs} configurations' worth of compute ({args.budget_configs * full} fold-epochs), "
             f"replayed {args.seeds} times; ASHA grace {GRACE}, factor {REDUCTION}, {AT_ONCE} trials at once. "
             "Compute is counted in full configurations' worth of fold-epochs (a configuration stopped at "
             "epoch 3 of 30 costs a tenth); the curves run past each search's budget only for the grid.", "",
             markdown_table(pd.DataFrame(summary)), "", *findings, "",
             f"![test C against compute]({args.out.with_suffix('.png').name})", "",
             "## The grid: every configuration's real skill", "",
             markdown_table(pd.DataFrame([{**r["config"], "lr": f"{r['config']['lr']:g}", "test C": f"{r['test_c']:.3f}",
                                           "OOF C (development)": f"{r['oof_c']:.3f}",
                                           f"mean fold C at epoch {GRACE}": f"{r['curve'][GRACE - 1]:.3f}",
                                           "reference": "yes" if r["config"] == REFERENCE else ""}
                                          for r in grid_rows])), "",
             f"{time.perf_counter() - started:.0f} s in all" + (f" (the table reused from {args.table}; training its "
                                                                 f"{len(table)} configurations took "
                                                                 f"{sum(r['seconds'] for r in table.values()) / 60:.0f} "
                                                                 f"worker-minutes)." if reused else ".")]
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
