"""The study's results table: per backbone x task x inputs cell, what its selected configuration predicts.

Rows (`rows()`), one column per cell:

- the BBC-CV C-index [95% CI] of the selected configuration (the headline: the selection among
  the cell's configurations is paid for, `evaluation.selection`);
- the selected configuration's own pooled out-of-fold C-index [95% CI] (the naive best,
  optimistic by construction) and the reference recipe's;
- the mean +- SD of the selected configuration's per-fold C-indices and the folds that learned
  nothing;
- its Brier score at 365 days and integrated Brier score, then a row for each other metric of
  `evaluation.metric_names.FINAL_METRICS` (Uno's C, the AUC at 365 days, and any metric added there);
- on a synthetic cohort (`datasets.synthetic`), the oracle C-index of the true clinical predictor,
  of what the images can tell (E[lp | image content]: the ceiling of an image-only cell) and of the
  total predictor on the same patients: what there was to learn (`analysis.oracle`).
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datasets.clinical_features import IMAGE, IMAGE_CLINICAL
from evaluation import metric_names as names
from evaluation.metrics import Estimate, SurvivalDataError
from analysis.oracle import ROW as ORACLE_ROW, ceiling, oracle_text
from evaluation.selection import bbc_cv
from search_spaces import cell_name
from trainables.config import TrainConfig

HEAD_ROWS = ("C-index, BBC-CV [95% CI]", "C-index, selected configuration [95% CI]", "C-index, reference recipe",
             "per-fold C-index, mean +- SD", "folds that learned nothing", "Brier score (365 d)", "IBS")
TAIL_ROWS = (ORACLE_ROW, "selected configuration", "trials (finished/pruned/failed)")
# The final metrics the table lays out itself (with their intervals or spread).
_LAID_OUT = {m.name for m in (names.OOF_CINDEX, names.OOF_CINDEX_LOW, names.OOF_CINDEX_HIGH, names.FOLD_CINDEX_MEAN,
                              names.FOLD_CINDEX_SD, names.FOLDS_COLLAPSED, names.BRIER_365, names.IBS)}


def metric_rows() -> dict[str, str]:
    """Every other metric of `evaluation.metric_names.FINAL_METRICS` -> its row (its meaning), read
    when a table is made: a metric added to the registry reaches results.md with no change here."""
    return {m.name: m.meaning.split(" (")[0] for m in names.FINAL_METRICS if m.name not in _LAID_OUT}


def rows() -> tuple[str, ...]:
    return (*HEAD_ROWS, *metric_rows().values(), *TAIL_ROWS)


ROWS = rows()


@dataclass
class CellResult:
    backbone: str
    task: str
    inputs: str = IMAGE
    finished: int = 0
    pruned: int = 0
    failed: int = 0
    fold_epochs: int = 0
    best: dict = field(default_factory=dict)  # final metrics of the selected (best finished) trial
    best_config: dict = field(default_factory=dict)
    best_trial: str = ""
    eval_times: tuple = ()  # the selected trial's survival-curve times [days]
    reference: dict = field(default_factory=dict)  # final metrics of the reference recipe's trial
    bbc: Estimate | None = None
    bbc_replayed: bool = False  # the headline replays the search's pruning too (`study.headline`)
    oracle: dict = field(default_factory=dict)  # `analysis.oracle` kind -> oracle C-index (synthetic cohorts)
    best_checkpoint: object = field(default=None, repr=False)  # Tune checkpoint of the selected trial

    @property
    def cell(self) -> str:
        return cell_name(self.backbone, self.task, self.inputs)

    @property
    def headline_pays_for(self) -> str:
        """What choices the cell's headline pays for (a tag of its run, a note of the results table)."""
        return "the search: ASHA's stops and the final choice" if self.bbc_replayed else "the final choice among finishers"

    @property
    def label(self) -> str:
        """The results table's column: ``backbone / task``, ``backbone+clinical / task`` for fusion."""
        return f"{self.backbone}{'+clinical' if self.inputs == IMAGE_CLINICAL else ''} / {self.task}"

    def metrics(self) -> dict[str, float]:
        """The cell's numbers as metrics of its run (`evaluation.metric_names.CELL_METRICS`)."""
        values = {**self.best, names.TRIALS_FINISHED.name: self.finished, names.TRIALS_PRUNED.name: self.pruned,
                  names.TRIALS_FAILED.name: self.failed}
        if self.bbc is not None:
            values.update({names.BBC_CINDEX.name: self.bbc.value, names.BBC_CINDEX_LOW.name: self.bbc.low,
                           names.BBC_CINDEX_HIGH.name: self.bbc.high})
        if self.reference:
            values[names.REFERENCE_CINDEX.name] = self.reference.get(names.OOF_CINDEX.name)
        return {m.name: values[m.name] for m in names.CELL_METRICS
                if isinstance(values.get(m.name), (int, float)) and math.isfinite(values[m.name])}


@dataclass
class StudyOutcome:
    """What `study.driver.run_study` returns: the results table and the cells behind it."""

    table: pd.DataFrame | None
    cells: list[CellResult]
    store: object


def _oof(result) -> pd.DataFrame | None:
    """A finished trial's out-of-fold predictions, read alone from its checkpoint (on object
    storage the checkpoint's fold models are not downloaded)."""
    checkpoint = result.checkpoint
    if checkpoint is None:
        return None
    try:
        with checkpoint.filesystem.open_input_file(f"{checkpoint.path.rstrip('/')}/{names.OOF_FILE}") as source:
            return pd.read_csv(io.BytesIO(source.read()))
    except (OSError, FileNotFoundError):
        return None


def _trial_order(result) -> str:
    return str((result.metrics or {}).get("trial_id") or getattr(result, "path", "") or "")


def _is_reference(config: dict, reference: dict) -> bool:
    return all(config.get(k) == v for k, v in reference.items())


def summarise(grid, space, budget: str, bootstrap: int = 1000, seed: int = 0) -> list[CellResult]:
    """Per cell: the selected trial (best pooled out-of-fold C-index), trial counts, the reference
    recipe's metrics and the BBC-CV estimate over all of the cell's finished configurations.

    `space` and `budget` say what each cell searched and its reference recipe."""
    cells: dict[str, CellResult] = {}
    finished = defaultdict(list)
    # In trial-id order, whatever order Tune lists them in (it differs between a run and its resume):
    # ties of the selection go to the lowest trial id, and BBC-CV sees its configurations and
    # patients in one order.
    for result in sorted(grid, key=_trial_order):
        config = result.config or {}
        if "backbone" not in config or "task" not in config:
            continue
        inputs = config.get("inputs", IMAGE)
        searched, reference = list(space.distributions_for(budget, inputs)), space.reference_for(budget, inputs)
        cell = cells.setdefault(cell_name(config["backbone"], config["task"], inputs),
                                CellResult(config["backbone"], config["task"], inputs))
        metrics = result.metrics or {}
        cell.fold_epochs += int(metrics.get(names.FOLD_EPOCHS.name, 0) or 0)
        ended = names.outcome(metrics, result.error is not None)
        if ended == names.FAILED_OUTCOME:
            cell.failed += 1
            continue
        if ended == names.PRUNED:
            cell.pruned += 1
            continue
        cell.finished += 1
        final = {m.name: metrics.get(m.name) for m in names.FINAL_METRICS}
        finished[cell.cell].append(result)
        if _is_reference(config, reference):
            cell.reference = final
        trial_id = str(metrics.get("trial_id", ""))
        if not cell.best or names.ranks_above(final, trial_id, cell.best, cell.best_trial):
            cell.best, cell.best_trial, cell.best_checkpoint = final, trial_id, result.checkpoint
            cell.best_config = {k: config.get(k) for k in searched}
            cell.eval_times = tuple(config.get("eval_times") or TrainConfig().eval_times)
    for key, results in finished.items():
        frames = [f for f in map(_oof, results) if f is not None]
        if not frames:
            continue
        aligned = frames[0][["patient_id", "time", "event"]].sort_values("patient_id", kind="stable")
        risks = np.stack([f.set_index("patient_id").loc[aligned["patient_id"], "risk"].to_numpy(float) for f in frames])
        try:
            cells[key].bbc = bbc_cv(aligned["time"], aligned["event"], risks, n_bootstrap=bootstrap, seed=seed)
        except SurvivalDataError:
            pass
    return list(cells.values())


def resource_summary(grid) -> dict[str, float]:
    """The study run's view of how busy the trials kept their hardware: the mean over trials of
    their last epoch's CPU and GPU use, and the largest memory any trial held."""
    values: dict[str, list[float]] = defaultdict(list)
    for result in grid:
        for metric in names.RESOURCE_METRICS:
            value = (result.metrics or {}).get(metric.name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                values[metric.name].append(float(value))
    out = {}
    for metric in names.RESOURCE_METRICS:
        found = values.get(metric.name)
        if found:
            peak = metric in (names.RSS_GIB, names.GPU_MEMORY_GIB)
            out[f"trials.{metric.name}_{'max' if peak else 'mean'}"] = max(found) if peak else sum(found) / len(found)
    return out


def _unpaid(cell: CellResult, mark: str) -> str:
    """`mark` where ASHA stopped some of the cell's trials but the headline could not replay it."""
    return mark if cell.pruned and not cell.bbc_replayed else ""


def _ci(value, low, high) -> str:
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _fmt_config(config: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def results_table(cells: list[CellResult]) -> pd.DataFrame:
    """Rows: `rows()`; columns: backbone / task."""
    columns = {}
    extra = metric_rows()
    for cell in cells:
        best, column = cell.best, dict.fromkeys(rows(), "")
        if best:
            column[ROWS[1]] = _ci(best[names.OOF_CINDEX.name], best[names.OOF_CINDEX_LOW.name],
                                  best[names.OOF_CINDEX_HIGH.name])
            column[ROWS[3]] = (f"{best[names.FOLD_CINDEX_MEAN.name]:.3f} +- {best[names.FOLD_CINDEX_SD.name]:.3f}"
                               if best.get(names.FOLD_CINDEX_SD.name) is not None else "")
            collapsed = int(best.get(names.FOLDS_COLLAPSED.name) or 0)
            column[ROWS[4]] = f"{collapsed} (flagged)" if collapsed else "0"
            column[ROWS[5]] = f"{best[names.BRIER_365.name]:.3f}"
            column[ROWS[6]] = f"{best[names.IBS.name]:.3f}"
            for metric, row in extra.items():
                value = best.get(metric)
                column[row] = f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"
            column["selected configuration"] = _fmt_config(cell.best_config)
        else:
            column[ROWS[1]] = "no finished trial"
        if cell.bbc is not None:
            column[ROWS[0]] = _ci(cell.bbc.value, cell.bbc.low, cell.bbc.high) + _unpaid(cell, " (pays for the "
                                                                                       "final choice only)")
        if cell.reference:
            column[ROWS[2]] = f"{cell.reference[names.OOF_CINDEX.name]:.3f}"
        else:
            column[ROWS[2]] = "pruned or failed"
        if cell.oracle:
            column[ORACLE_ROW] = oracle_text(cell.oracle)
        column["trials (finished/pruned/failed)"] = f"{cell.finished}/{cell.pruned}/{cell.failed}"
        columns[cell.label] = column
    table = pd.DataFrame(columns)
    if not any(cell.oracle for cell in cells):
        table = table.drop(index=ORACLE_ROW)
    return table


# The terminal's view of the table: one line per cell within 120 columns (the full table, with
# the per-fold spread and the selected configurations, is in results.md / results.csv).
_TERMINAL_COLUMNS = (("cell", 32), ("BBC-CV C [95% CI]", 20), ("selected C [95% CI]", 20), ("ref C", 5),
                     ("Brier", 5), ("IBS", 5), ("oracle", 6), ("trials f/p/x", 12))


def terminal_table(cells: list[CellResult]) -> str:
    """The results as lines of at most 120 characters: the numbers per cell, then each cell's
    selected configuration (wrapped), and a legend."""
    def row(values) -> str:
        return "  ".join(f"{str(v)[:w]:<{w}}" for v, (_, w) in zip(values, _TERMINAL_COLUMNS)).rstrip()

    lines = [row([h for h, _ in _TERMINAL_COLUMNS])]
    configurations = []
    for cell in cells:
        best = cell.best
        selected = (f"{best[names.OOF_CINDEX.name]:.3f} [{best[names.OOF_CINDEX_LOW.name]:.2f}, "
                    f"{best[names.OOF_CINDEX_HIGH.name]:.2f}]") if best else "none finished"
        bbc = (f"{cell.bbc.value:.3f} [{cell.bbc.low:.2f}, {cell.bbc.high:.2f}]{_unpaid(cell, '*')}"
               if cell.bbc is not None else "")
        reference = f"{cell.reference[names.OOF_CINDEX.name]:.3f}" if cell.reference else "-"
        lines.append(row([cell.label, bbc, selected, reference,
                          f"{best[names.BRIER_365.name]:.3f}" if best else "", f"{best[names.IBS.name]:.3f}" if best else "",
                          f"{ceiling(cell.oracle, cell.inputs):.3f}" if ceiling(cell.oracle, cell.inputs) is not None
                          else "",
                          f"{cell.finished}/{cell.pruned}/{cell.failed}"]))
        if cell.best_config:
            configurations.append(f"  {cell.label}: {_fmt_config(cell.best_config)}")
    lines.append("ref C: the reference recipe's C (- if ASHA stopped it); oracle (synthetic cohorts): C of what the "
                 "cell's inputs")
    lines.append("can tell (image only: the image content, E[lp | image]; image+clinical: the true total predictor);")
    lines.append("trials f/p/x: finished / pruned by ASHA / failed" + (
        ";\n*: the headline pays for the final choice only (ASHA's stops not replayed)"
        if any(_unpaid(c, "*") for c in cells) else "") + ". Selected configurations:")
    for line in configurations:
        while len(line) > 120:
            cut = line.rfind(", ", 0, 119)
            if cut <= 6:  # no separator to wrap at (a long value): cut it
                lines.append(line[:120])
                line = "      " + line[120:]
                continue
            lines.append(line[:cut + 1])
            line = "      " + line[cut + 2:]
        lines.append(line)
    return "\n".join(lines)


def write_tables(table: pd.DataFrame, directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    csv, markdown = directory / "results.csv", directory / "results.md"
    table.to_csv(csv)
    lines = ["| | " + " | ".join(table.columns) + " |", "|---|" + "---|" * len(table.columns)]
    lines += ["| " + index + " | " + " | ".join(str(v) for v in row) + " |" for index, row in table.iterrows()]
    markdown.write_text("\n".join(lines) + "\n")
    return {"csv": csv, "markdown": markdown}
