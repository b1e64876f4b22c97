"""A short study with fractional GPUs per trial, with GPU utilisation sampled (for GPU machines).

    python -m benchmarks.gpu_study [--gpus-per-trial 0.25] [--trials 4] [--out benchmarks/results/gpu_study.md]

Runs the demo study's first cell with --trials trials packed on the GPU(s) at once and samples
`nvidia-smi` every 0.5 s; reports wall time, the fraction of samples with the GPU busy, mean
utilisation and peak memory. Called by benchmarks/gpu.sh.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._machine import describe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus-per-trial", type=float, default=0.25)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=150)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_study.md"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpu-study-"))
    import shutil

    (work / "util.csv").write_text("")
    sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                                "--format=csv,noheader,nounits", "-lms", "500"],
                               stdout=open(work / "util.csv", "w")) if shutil.which("nvidia-smi") else None
    started = time.perf_counter()
    study = subprocess.run([sys.executable, "-m", "study.run", "--space", "literature_priors", "--tasks", "os_all",
                            "--backbones", "seresnext50", "--num-samples", str(args.trials), "--max-concurrent",
                            str(args.trials), "--gpus-per-trial", str(args.gpus_per_trial), "--cpus-per-trial", "2",
                            "--tracking-uri", f"sqlite:///{work}/m.db", "--storage-path", str(work / "rr"),
                            "--name", "gpu_study"], capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if sampler is not None:
        sampler.terminate()
    rows = [line.split(", ") for line in (work / "util.csv").read_text().splitlines() if line.count(",") == 2]
    utilisation = [float(r[1]) for r in rows]
    memory = [float(r[2]) for r in rows]
    busy = sum(u > 0 for u in utilisation) / max(1, len(utilisation))
    text = "\n".join([
        "# A study with fractional GPUs per trial", "", describe(), "",
        f"Command: `python -m benchmarks.gpu_study --gpus-per-trial {args.gpus_per_trial} --trials {args.trials}` "
        "(demo cohort, SE-ResNeXt50 on os_all)", "",
        f"- exit status {study.returncode}; wall time {wall:.0f} s; {args.trials} trials at {args.gpus_per_trial} GPU each",
        f"- GPU busy in {busy:.0%} of {len(utilisation)} samples; mean utilisation {sum(utilisation) / max(1, len(utilisation)):.0f}%; "
        f"peak memory {max(memory, default=0):.0f} MiB", "",
        "```", study.stdout[-2500:], study.stderr[-1500:] if study.returncode else "", "```", ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return study.returncode


if __name__ == "__main__":
    raise SystemExit(main())
