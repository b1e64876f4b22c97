"""The study's results table, like the reference study's: per backbone x task the best
configuration's CV C-index [95% CI] and Brier score at 365 days."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from study.tracking import FINAL_METRICS


@dataclass
class CellResult:
    backbone: str
    task: str
    finished: int = 0
    pruned: int = 0
    failed: int = 0
    fold_epochs: int = 0
    best: dict = field(default_factory=dict)  # final metrics of the best finished trial
    best_config: dict = field(default_factory=dict)
    best_trial: str = ""


def summarise(backbone: str, task: str, grid, searched: list[str]) -> CellResult:
    """Best finished trial of a cell (by pooled out-of-fold C-index) and trial counts."""
    cell = CellResult(backbone, task)
    best_value = -math.inf
    for result in grid:
        metrics = result.metrics or {}
        cell.fold_epochs += int(metrics.get("fold_epochs", 0) or 0)
        if result.error is not None or metrics.get("failed"):
            cell.failed += 1
        elif metrics.get("final"):
            cell.finished += 1
            value = metrics.get("cindex", -math.inf)
            if value > best_value:
                best_value = value
                cell.best = {k: metrics.get(k) for k in FINAL_METRICS}
                cell.best_config = {k: result.config.get(k) for k in searched}
                cell.best_trial = metrics.get("trial_id", "")
        else:
            cell.pruned += 1
    return cell


def _fmt_config(config: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def results_table(cells: list[CellResult]) -> pd.DataFrame:
    """Rows: C-index [95% CI], Brier score (365 d), IBS, trials; columns: backbone / task."""
    columns = {}
    for cell in cells:
        best = cell.best
        if best:
            cindex = f"{best['cindex']:.3f} [{best['cindex_low']:.4f}, {best['cindex_high']:.4f}]"
            brier, ibs = f"{best['brier_365']:.3f}", f"{best['ibs']:.3f}"
        else:
            cindex = brier = ibs = "no finished trial"
        columns[f"{cell.backbone} / {cell.task}"] = {
            "C-index [95% CI]": cindex, "Brier score (365 d)": brier, "IBS": ibs,
            "best config": _fmt_config(cell.best_config) if best else "",
            "trials (finished/pruned/failed)": f"{cell.finished}/{cell.pruned}/{cell.failed}",
        }
    return pd.DataFrame(columns)


def write_tables(table: pd.DataFrame, directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    csv, markdown = directory / "results.csv", directory / "results.md"
    table.to_csv(csv)
    lines = ["| | " + " | ".join(table.columns) + " |", "|---|" + "---|" * len(table.columns)]
    lines += ["| " + index + " | " + " | ".join(str(v) for v in row) + " |" for index, row in table.iterrows()]
    markdown.write_text("\n".join(lines) + "\n")
    return {"csv": csv, "markdown": markdown}
