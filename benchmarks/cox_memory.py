"""Does the Cox head's risk-set memory help? One fold of the demo cohort with and without it.

    python -m benchmarks.cox_memory [--seeds 0 1 2] [--lrs 1e-3 1e-4] [--epochs 20]

The memory adds the last `cox_memory` samples of earlier batches (detached, so stale) to each
batch's risk sets. For every learning rate, memory size and seed this trains fold 0 of 5 of the
demo cohort (SE-ResNeXt50 at width 0.25, batch 16) and records, per epoch, the training loss,
the validation C-index and the spread (SD) of the network's log hazards on the training fold.
Losses are not comparable across memory sizes (larger risk sets give larger losses); the
C-index and the drift of the spread are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks._demo_fold import demo_fold
from benchmarks._machine import describe, write_result
from trainables.config import TrainConfig
from trainables.fold import FoldData, FoldTrainer


def _run(data: FoldData, lr: float, memory: int, seed: int, epochs: int) -> list[tuple[float, float, float]]:
    config = TrainConfig(backbone="seresnext50", width=0.25, depth=0.34, batch_size=16, lr=lr, weight_decay=1e-4,
                         epochs=epochs, warmup_epochs=2, cox_memory=memory, seed=seed, augmentation=0.5)
    trainer = FoldTrainer(data, config)
    history = []
    while not trainer.finished:
        record = trainer.step()
        spread = float(trainer.predict(data.train)[:, 0].std())
        history.append((record["train_loss"], record["val_cindex"], spread))
    return history


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cox_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-4])
    parser.add_argument("--memories", type=int, nargs="+", default=[0, 256])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cox_memory.md")
    args = parser.parse_args(argv)
    data = demo_fold()
    lines = ["# Cox head: risk-set memory vs none", "", describe(),
             f"- demo cohort, fold 0 of 5 ({len(data.train)} training patients), SE-ResNeXt50 width 0.25, batch 16, "
             f"{args.epochs} epochs, weight decay 1e-4, augmentation 0.5", "",
             "| lr | memory | seed | training loss, first -> last epoch | best val C-index | last val C-index "
             "| log-hazard SD at epochs 5 / 10 / last |", "|---:|---:|---:|---|---:|---:|---|"]
    summary: dict[tuple[float, int], list[tuple[float, float]]] = {}
    for lr in args.lrs:
        for memory in args.memories:
            for seed in args.seeds:
                history = _run(data, lr, memory, seed, args.epochs)
                loss, cindex, spread = (np.array(column) for column in zip(*history))
                marks = [spread[min(e, len(spread)) - 1] for e in (5, 10, len(spread))]
                lines.append(f"| {lr:g} | {memory} | {seed} | {loss[0]:.2f} -> {loss[-1]:.2f} | {np.nanmax(cindex):.3f} "
                             f"| {cindex[-1]:.3f} | {' / '.join(f'{m:.2f}' for m in marks)} |")
                summary.setdefault((lr, memory), []).append((float(np.nanmax(cindex)), float(spread[-1])))
                print(lines[-1], flush=True)
    lines += ["", "| lr | memory | mean best val C-index | mean last log-hazard SD |", "|---:|---:|---:|---:|"]
    lines += [f"| {lr:g} | {memory} | {np.mean([c for c, _ in rows]):.3f} | {np.mean([s for _, s in rows]):.2f} |"
              for (lr, memory), rows in summary.items()]
    lines += ["", f"Command: `python -m benchmarks.cox_memory --seeds {' '.join(map(str, args.seeds))} "
              f"--lrs {' '.join(f'{lr:g}' for lr in args.lrs)} --memories {' '.join(map(str, args.memories))} "
              f"--epochs {args.epochs}`", ""]
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
