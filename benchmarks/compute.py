"""Training throughput per backbone: volumes/s, model FLOPs per volume and achieved TFLOP/s, for
fp32 vs bf16 autocast, channels-last-3d and torch.compile; on CPU or a GPU.

    python -m benchmarks.compute --device cpu --batch 2 --steps 2 --modes fp32          # this machine
    python -m benchmarks.compute --device cuda --batch 64 --modes fp32 bf16 bf16_cl bf16_cl_compile

Each (backbone, mode) runs `--warmup` untimed and `--steps` timed optimizer steps (forward, Cox
loss, backward, AdamW) on random volumes of `--shape`. FLOPs come from torch's FlopCounterMode on
one forward pass (training ~= 3x forward). The matrix-product peak is measured on the same device
(bf16 8192^3 GEMMs on GPU, fp32 4096^3 on CPU), so utilisation is a ratio of two measurements.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._machine import describe
from trainables.backbones import BACKBONES, build_backbone
from trainables.losses import cox_nll

MODES = ("fp32", "bf16", "bf16_cl", "bf16_cl_compile", "fp32_cl")


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.lower().split("x"))


def forward_flops(name: str, shape, width: float, depth: float) -> float:
    model = build_backbone(name, shape[0], 1, width, depth).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device) -> float:
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_rate(name: str, mode: str, shape, batch: int, steps: int, warmup: int, device: torch.device,
               width: float, depth: float) -> tuple[float, int, bool]:
    """Volumes per second, the batch size actually used (halved on out-of-memory) and whether every
    loss stayed finite (a precision mode whose kernels give NaN is fast but useless)."""
    while batch >= 1:
        try:
            rate, finite = _measure(name, mode, shape, batch, steps, warmup, device, width, depth)
            return rate, batch, finite
        except torch.OutOfMemoryError:
            pass
        # The failed attempt's model, optimizer state and batch died with its frame at the end of
        # the except block; hand their memory back before trying half the batch.
        if device.type == "cuda":
            torch.cuda.empty_cache()
        batch //= 2
    raise RuntimeError(f"{name} does not fit even with batch 1")


def _measure(name: str, mode: str, shape, batch: int, steps: int, warmup: int, device: torch.device,
             width: float, depth: float) -> tuple[float, bool]:
    model = build_backbone(name, shape[0], 1, width, depth).to(device)
    channels_last = "_cl" in mode
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    step_model = torch.compile(model) if "compile" in mode else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, *shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    time_ = torch.rand(batch, device=device) * 1000
    event = (torch.rand(batch, device=device) < 0.7).float()
    use_bf16 = mode.startswith("bf16")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = step_model(x)
        loss = cox_nll(out.float(), event, time_)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    losses = [step() for _ in range(warmup)]
    _sync(device)
    start = time.perf_counter()
    losses += [step() for _ in range(steps)]
    _sync(device)
    rate = batch * steps / (time.perf_counter() - start)
    return rate, bool(torch.isfinite(torch.stack(losses)).all())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=_shape, default=(4, 120, 120, 78), help="C x X x Y x Z")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backbones", nargs="+", default=sorted(BACKBONES))
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "bf16_cl", "bf16_cl_compile"], choices=MODES)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--depth", type=float, default=1.0)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new runs after this")
    parser.add_argument("--out", type=Path, default=None, help="results file (Markdown)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    torch.backends.cudnn.benchmark = True
    peak = matmul_peak(device)
    lines = [f"# Training throughput at {'x'.join(map(str, args.shape))} on {device.type}", "", describe(),
             f"- measured matrix-product peak: {peak / 1e12:.2f} TFLOP/s "
             f"({'bf16' if device.type == 'cuda' else 'fp32'})",
             f"- width {args.width}, depth {args.depth}, {args.steps} timed steps after {args.warmup} warm-up", "",
             "| backbone | fwd GFLOP/volume | mode | batch | volumes/s | train TFLOP/s | of peak | losses finite |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    print("\n".join(lines), flush=True)
    for name in args.backbones:
        flops = forward_flops(name, args.shape, args.width, args.depth)
        for mode in args.modes:
            if time.perf_counter() - started > args.budget_s:
                lines.append(f"| {name} | | {mode} | | skipped: time budget | | | |")
                print(lines[-1], flush=True)
                continue
            if device.type == "cpu" and mode.startswith("bf16") and "_cl" in mode:
                # ResNet50-CBAM's second bf16 channels-last backward never returned with 2 threads (PyTorch 2.13).
                lines.append(f"| {name} | | {mode} | | skipped: bf16 channels-last hangs on the CPU | | | |")
                print(lines[-1], flush=True)
                continue
            rate, batch, finite = train_rate(name, mode, args.shape, args.batch, args.steps, args.warmup, device,
                                     args.width, args.depth)
            achieved = 3 * flops * rate
            lines.append(f"| {name} | {flops / 1e9:.0f} | {mode} | {batch} | {rate:.2f} | {achieved / 1e12:.3f} | "
                         f"{achieved / peak:.1%} | {'yes' if finite else '**no (NaN/inf)**'} |")
            print(lines[-1], flush=True)
    if device.type == "cpu" and any(m.startswith("bf16") for m in args.modes):
        lines += ["", "The peak is float32's, so bf16 rows can exceed 100%. `TrainConfig.precision` keeps float32 on "
                  "CPUs: see `benchmarks/results/precision.md` for bf16 losses that became NaN in training."]
    lines += ["", f"Command: `python -m benchmarks.compute --device {args.device} --batch {args.batch} "
              f"--steps {args.steps} --modes {' '.join(args.modes)}`", ""]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
