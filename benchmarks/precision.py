"""bfloat16 autocast vs float32: training time and what the network learns, side by side.

    python -m benchmarks.precision [--seeds 0 1 2] [--epochs 20] [--device cpu]

For each backbone, precision and seed this trains fold 0 of 5 of the demo cohort (width 0.25,
batch 16, lr 1e-3) and records the wall time, the training loss and the validation C-index.
This is the measurement behind `TrainConfig.precision` "auto" (bf16 on a GPU, float32 on a CPU):
on a CPU with bf16 instructions, bf16 trains faster, but a backbone whose loss becomes NaN is
listed with the error.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np

from benchmarks._demo_fold import demo_fold
from benchmarks._machine import describe, write_result
from trainables.config import TrainConfig
from trainables.fold import FoldTrainer
from trainables.backbones import BACKBONES
from trainables.fold import TrainingDivergedError


def cpu_bf16_flags() -> str:
    """The CPU's bfloat16 instruction flags (AVX512-BF16, AMX), or "none"."""
    try:
        flags = set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return "unknown"
    return ", ".join(sorted(flags)) or "none"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbones", nargs="+", default=sorted(BACKBONES))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "precision.md")
    args = parser.parse_args(argv)
    data = demo_fold()
    lines = ["# bfloat16 autocast vs float32 training", "", describe(),
             f"- CPU bfloat16 instructions: {cpu_bf16_flags()}",
             f"- demo cohort, fold 0 of 5 ({len(data.train)} training patients), width 0.25, depth 0.34, batch 16, "
             f"lr 1e-3, weight decay 1e-4, Cox head, {args.epochs} epochs, on {args.device}", "",
             "| backbone | precision | seed | seconds | training loss, last epoch | best val C-index | mean val C-index, last 5 epochs |",
             "|---|---|---:|---:|---:|---:|---:|"]
    summary: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for backbone in args.backbones:
        for precision in ("fp32", "bf16"):
            for seed in args.seeds:
                config = TrainConfig(backbone=backbone, width=0.25, depth=0.34, batch_size=16, lr=1e-3,
                                     weight_decay=1e-4, epochs=args.epochs, warmup_epochs=2, cox_memory=0, seed=seed,
                                     augmentation=0.5, precision=precision, device=args.device)
                trainer = FoldTrainer(data, config)
                started = time.perf_counter()
                history, failure = [], ""
                try:
                    while not trainer.finished:
                        history.append(trainer.step())
                except TrainingDivergedError as exc:
                    failure = str(exc)
                seconds = time.perf_counter() - started
                if failure:
                    lines.append(f"| {backbone} | {precision} | {seed} | {seconds:.1f} | {failure} | | |")
                    summary.setdefault((backbone, precision), [])
                    print(lines[-1], flush=True)
                    continue
                cindex = [h["val_cindex"] for h in history]
                late = float(np.mean(cindex[-5:]))
                lines.append(f"| {backbone} | {precision} | {seed} | {seconds:.1f} | {history[-1]['train_loss']:.3f} "
                             f"| {max(cindex):.3f} | {late:.3f} |")
                summary.setdefault((backbone, precision), []).append((seconds, max(cindex), late))
                print(lines[-1], flush=True)
    lines += ["", "| backbone | precision | mean seconds | fp32 / bf16 time | mean best val C | mean late val C |",
              "|---|---|---:|---:|---:|---:|"]
    for (backbone, precision), rows in summary.items():
        if not rows or not summary[(backbone, "fp32")]:
            lines.append(f"| {backbone} | {precision} | every seed diverged | | | |")
            continue
        seconds = np.mean([r[0] for r in rows])
        speed = np.mean([r[0] for r in summary[(backbone, "fp32")]]) / seconds
        lines.append(f"| {backbone} | {precision} | {seconds:.1f} | {speed:.2f}x | {np.mean([r[1] for r in rows]):.3f} "
                     f"| {np.mean([r[2] for r in rows]):.3f} |")
    lines += ["", f"Command: `python -m benchmarks.precision --seeds {' '.join(map(str, args.seeds))} "
              f"--epochs {args.epochs} --device {args.device}`", ""]
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
