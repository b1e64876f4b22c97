"""Cohorts for training: a store, a patient filter, an endpoint, and seeded stratified folds.

Filters
-------
``all`` (every usable patient), ``glioblastoma`` (the glioblastoma flag is 1), or an expression
over the clinical columns such as ``grade >= 3 and idh == 0``: comparisons (``== != < <= > >=``)
of a column with a number, joined by ``and``/``or``/``not`` and parentheses. The expression is
parsed, never evaluated as Python. A patient whose column is unknown (NaN) fails a comparison.

Endpoints
---------
``os``: overall survival (time in days, event). ``1yr``: survival administratively censored at
day 365, with every patient of the filter kept (as the reference study did): time = min(T, 365),
event = death on or before day 365. A death after day 365 becomes a survivor censored at 365;
a patient censored before day 365 stays, censored at their last follow-up, so the heads and the
metrics handle them as censored (never dropped, never counted as survivors). The 1-year cohort
of a filter therefore holds the same patients as its OS cohort.

Folds
-----
Patient-level, stratified by the endpoint's event (the 1-year event for ``1yr``) and the
glioblastoma flag, seeded. They depend only on the
patient ids, the strata and the seed, so every backbone and every trial of a task sees the same
folds, and a rebuilt store gives the same folds.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from datasets.errors import InputError
from datasets.store import CohortStore

ENDPOINTS = ("os", "1yr")
ONE_YEAR_DAYS = 365.0
# Administrative censoring of each endpoint [days] (None: follow-up as recorded).
HORIZONS: dict[str, float | None] = {"os": None, "1yr": ONE_YEAR_DAYS}


def truncate(time: np.ndarray, event: np.ndarray, horizon: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Survival administratively censored at `horizon` days: (min(T, horizon), death by horizon)."""
    time, event = np.asarray(time, dtype=float), np.asarray(event).astype(int)
    if horizon is None:
        return time, event
    return np.minimum(time, horizon), ((event == 1) & (time <= horizon)).astype(int)
_COMPARE = {ast.Eq: np.equal, ast.NotEq: np.not_equal, ast.Lt: np.less, ast.LtE: np.less_equal,
            ast.Gt: np.greater, ast.GtE: np.greater_equal}


def evaluate_filter(expression: str, table: pd.DataFrame) -> np.ndarray:
    """Boolean mask of the rows of `table` selected by a filter expression (see module doc)."""
    text = expression.strip()
    if text in ("", "all"):
        return np.ones(len(table), dtype=bool)
    if text in ("glioblastoma", "gbm"):
        text = "glioblastoma == 1"
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise InputError(f"cohort filter {expression!r} is not a valid expression ({exc.msg})") from None

    def value(node: ast.AST):
        if isinstance(node, ast.Name):
            if node.id not in table.columns:
                raise InputError(f"cohort filter {expression!r}: unknown column {node.id!r}; "
                                 f"columns are {list(table.columns)}")
            return table[node.id].to_numpy(dtype=float)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return -float(node.operand.value)
        raise InputError(f"cohort filter {expression!r}: {ast.unparse(node)!r} is not a column or a number")

    def select(node: ast.AST) -> np.ndarray:
        if isinstance(node, ast.BoolOp):
            parts = [select(v) for v in node.values]
            combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            return combine.reduce(parts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~select(node.operand)
        if isinstance(node, ast.Compare):
            out = np.ones(len(table), dtype=bool)
            left = value(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                if type(op) not in _COMPARE:
                    raise InputError(f"cohort filter {expression!r}: operator {type(op).__name__} is not allowed")
                right = value(right_node)
                with np.errstate(invalid="ignore"):
                    out &= np.asarray(_COMPARE[type(op)](left, right), dtype=bool)
                left = right
            return out
        raise InputError(f"cohort filter {expression!r}: {ast.unparse(node)!r} is not a comparison")

    return select(tree.body)


def stratified_folds(patient_ids: list[str], strata: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) per patient, balanced within each stratum.

    Patients are ordered by id, shuffled with `seed`, grouped by stratum, and dealt out to the
    folds in turn, so each stratum's members differ by at most one between folds.
    """
    n = len(patient_ids)
    if k < 2:
        raise InputError(f"folds must be at least 2, got {k}")
    if n < k:
        raise InputError(f"cannot make {k} folds from {n} patients")
    order = np.argsort(np.asarray(patient_ids, dtype=object), kind="stable")
    rng = np.random.default_rng(seed)
    order = order[rng.permutation(n)]
    order = order[np.argsort(np.asarray(strata)[order], kind="stable")]
    folds = np.empty(n, dtype=int)
    folds[order] = (np.arange(n) + int(rng.integers(k))) % k
    return folds


@dataclass(frozen=True)
class CohortSpec:
    """Which patients and which outcome: a task's data definition.

    `exclude`: patient ids left out whatever the filter says (the outer test fold of nested CV).
    """

    filter: str = "all"
    endpoint: str = "os"
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise InputError(f"endpoint {self.endpoint!r} is not one of {list(ENDPOINTS)}")


class Cohort:
    """The patients of a store selected by a `CohortSpec`, with their outcomes.

    Attributes
    ----------
    store
        The `CohortStore`.
    slots
        int [n]: store slot of each patient.
    patient_ids
        list of n ids.
    time, event
        float [n] days and int [n] 0/1 of the endpoint (for ``1yr``: censored at day 365).
    horizon
        The endpoint's administrative censoring time [days], None for ``os``.
    clinical
        DataFrame [n x clinical columns], index = patient id.
    """

    def __init__(self, store: CohortStore | str | Path, spec: CohortSpec = CohortSpec()):
        self.store = store if isinstance(store, CohortStore) else CohortStore(store)
        self.spec = spec
        usable = self.store.usable()
        table = self.store.clinical().iloc[usable]
        keep = evaluate_filter(spec.filter, table)
        if spec.exclude:
            keep &= ~table.index.isin(spec.exclude)
        self.slots = usable[keep]
        self.clinical = table[keep]
        self.patient_ids = list(self.clinical.index)
        self.horizon = HORIZONS[spec.endpoint]
        self.time, self.event = truncate(self.clinical["time"].to_numpy(dtype=float),
                                         self.clinical["event"].to_numpy(dtype=float), self.horizon)
        if len(self.slots) == 0:
            raise InputError(f"cohort store {self.store.path}: no patient left after filter {spec.filter!r} "
                             f"and endpoint {spec.endpoint!r} ({len(usable)} usable patients in the store)")

    def __len__(self) -> int:
        return len(self.slots)

    def strata(self) -> np.ndarray:
        gbm = self.clinical["glioblastoma"].fillna(-1).to_numpy(dtype=int) if "glioblastoma" in self.clinical else 0
        return self.event * 10 + gbm + 1

    def folds(self, k: int, seed: int = 0) -> np.ndarray:
        """Fold number per patient; raises (InputError, before anything trains) if a validation fold
        could not be scored: fewer than two patients, no event, or no pair of patients whose order of
        death it could judge (Harrell's C undefined)."""
        where = f"cohort {self.spec.filter!r}/{self.spec.endpoint} ({len(self)} patients, {int(self.event.sum())} events)"
        if len(self) < 2 * k:
            raise InputError(f"{where}: {k} folds would hold fewer than two patients each; use fewer folds "
                             f"(at most {len(self) // 2}) or more patients")
        folds = stratified_folds(self.patient_ids, self.strata(), k, seed)
        for fold in range(k):
            event, time = self.event[folds == fold], self.time[folds == fold]
            if event.sum() == 0:
                raise InputError(f"{where}: fold {fold} of {k} has no event; use fewer folds")
            if not (event.astype(bool) & (time < time.max())).any():
                raise InputError(f"{where}: fold {fold} of {k} has no pair of patients whose order of death can be "
                                 "judged (no death before the fold's last time), so its C-index is undefined; use "
                                 "fewer folds")
        return folds

    def describe(self) -> dict:
        return {"patients": len(self), "events": int(self.event.sum()),
                "censored_fraction": float(1 - self.event.mean()), "filter": self.spec.filter,
                "endpoint": self.spec.endpoint}
