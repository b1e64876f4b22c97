"""Machine and package description written at the top of every benchmark result."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def describe() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    lines = [f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {cpu}",
             f"- python {platform.python_version()}, torch {torch.__version__}"]
    try:
        with open("/proc/meminfo") as handle:
            lines.append(f"- memory: {int(handle.readline().split()[1]) / 2**20:.0f} GiB")
    except OSError:
        pass
    if torch.cuda.is_available():
        lines.append(f"- GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}")
    packages = []
    for name in ("monai", "zarr", "numpy", "ray", "optuna", "mlflow"):
        try:
            packages.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    lines.append("- packages: " + ", ".join(packages))
    return "\n".join(lines)


def write_result(path: Path, lines: list[str]) -> None:
    """Write a benchmark's results file (creating its folder) and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines))


def markdown_table(frame, floatfmt: str = ".2f") -> str:
    """A pipe table of a DataFrame (no tabulate dependency)."""
    def cell(value) -> str:
        return format(value, floatfmt) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
