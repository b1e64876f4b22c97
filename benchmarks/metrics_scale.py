"""Survival metrics at scale: Harrell's C, Brier score and a 1,000-resample bootstrap CI on
100,000 patients, next to lifelines and scikit-survival on the same data (side by side).

    python -m benchmarks.metrics_scale [--n 100000] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from evaluation.metrics import bootstrap_ci, brier_score, harrell_c
from benchmarks._machine import describe, write_result

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn, repeat: int = 1):
    start = time.perf_counter()
    for _ in range(repeat):
        value = fn()
    return value, (time.perf_counter() - start) / repeat


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "metrics_scale.md")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    risk = rng.normal(size=args.n)
    time_ = np.ceil(rng.exponential(np.exp(-risk)) * 365)
    event = rng.random(args.n) < 0.7
    surv = np.exp(-np.exp(risk) * 0.5)
    harrell_c(time_[:100], event[:100], risk[:100])  # numba compilation outside the timings
    rows = []
    c, seconds = _timed(lambda: harrell_c(time_, event, risk), 3)
    rows.append((f"Harrell's C, n={args.n}", seconds, c))
    b, seconds = _timed(lambda: brier_score(time_, event, surv, 365.0)[0], 3)
    rows.append((f"IPCW Brier at 365 d, n={args.n}", seconds, b))
    ci, seconds = _timed(lambda: bootstrap_ci(harrell_c, time_, event, risk, n_resamples=args.resamples, seed=0))
    rows.append((f"bootstrap 95% CI of C, {args.resamples} resamples, n={args.n}", seconds, str(ci)))
    from lifelines.utils import concordance_index

    value, seconds = _timed(lambda: concordance_index(time_, -risk, event))
    rows.append((f"lifelines concordance_index, n={args.n}", seconds, value))
    small = 20_000
    from sksurv.metrics import concordance_index_censored

    value, seconds = _timed(lambda: concordance_index_censored(event[:small], time_[:small], risk[:small])[0])
    ours, our_seconds = _timed(lambda: harrell_c(time_[:small], event[:small], risk[:small]), 3)
    rows.append((f"scikit-survival concordance_index_censored, n={small}", seconds, value))
    rows.append((f"ours at n={small} (same data)", our_seconds, ours))
    lines = ["# Survival metrics at scale", "", describe(), "", "| computation | seconds | value |", "|---|---:|---|"]
    lines += [f"| {name} | {sec:.3f} | {val if isinstance(val, str) else f'{val:.6f}'} |" for name, sec, val in rows]
    lines += ["", f"Ratio at n={small}: scikit-survival / ours = {rows[-2][1] / rows[-1][1]:.0f}x; "
              f"at n={args.n}: lifelines / ours = {rows[3][1] / rows[0][1]:.1f}x.", "",
              "Command: `python -m benchmarks.metrics_scale`", ""]
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
