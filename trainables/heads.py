"""Survival heads: what the network outputs mean, their loss, and their predictions.

Every head turns network outputs into two scores and survival probabilities at any times:

- ``score(outputs)``: how one fold model orders patients (higher = worse). It is what the epoch's
  validation C-index is computed on, and it may carry an arbitrary, fold-specific offset.
- ``risk(outputs)``: the deep prognostic index (DPI) written to ``oof_predictions.csv``. It is
  comparable across folds (no per-fold offset), so the pooled out-of-fold C-index and any model
  fitted on the DPI do not mix K arbitrary zero points. Call ``fit`` (on the fold's training
  patients) first.

Heads:

- ``cox``: one output, the log relative hazard eta. Loss: Cox partial likelihood (Efron ties),
  which is invariant to a constant shift of eta, so each fold model has its own arbitrary offset
  (on whas500, per-fold offsets of SD 1 took a 10-fold pooled C from 0.767 to 0.712). Its DPI is
  therefore the *fold-calibrated* log cumulative hazard at one year, log H(365 | x) = eta -
  centre + log H0(365), with H0 the Breslow baseline fitted on that fold's training patients:
  a shift of eta moves H0 by the opposite amount, so the DPI does not move. Survival: Breslow.
  (If a training fold has no death by day 365, its first death time is the reference.)
  An optional *risk-set memory* (`memory` > 0) adds the detached predictions of earlier batches
  to each batch's risk sets (off by default; see `benchmarks/results/cox_memory.md`).
- ``logistic_hazard``: one output per discrete time (Kvamme & Borgan 2019; pycox cuts).
  Cuts ``uniform`` over `horizon_days`, or ``exponential``: the reference study's 19 breaks at
  the quantiles k/20 of an exponential distribution with a half-life of 730 days (0 to about
  3,155 days), denser where deaths are frequent. Survival: product of (1 - hazard), linear
  between cuts. DPI: minus the restricted mean survival time up to the last cut (days), an
  absolute quantity.
- ``binary``: one output, the logit of death by day 365 (the 1-year endpoint). A patient censored
  before day 365 has an unknown 1-year status: they enter the loss with weight 0, and the others
  with inverse-probability-of-censoring weights, 1 / G(T-) for a death at T and 1 / G(365-) for a
  1-year survivor, G being the reverse Kaplan-Meier estimate on the fold's training patients
  (never dropped from the cohort, never counted as survivors). surv_365 = 1 - sigmoid(logit); the
  curve at other times comes from a Breslow baseline on the logit. DPI: the logit (absolute).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pycox.preprocessing.label_transforms import LabTransDiscreteTime

from evaluation.metrics import CensoringKM
from datasets.cohort import ONE_YEAR_DAYS as ONE_YEAR
from datasets.errors import InputError
from trainables.losses import binary_nll, cox_nll, logistic_hazard_nll

CUT_SPACINGS = ("uniform", "exponential")


def logistic_hazard_cuts(intervals: int = 19, horizon_days: float = 1825.0, spacing: str = "uniform",
                         half_life_days: float = 730.0) -> np.ndarray:
    """Discrete times [days] of the logistic-hazard head: `intervals` + 1 cuts from 0.

    ``uniform``: evenly up to `horizon_days`. ``exponential``: the quantiles k / (intervals + 1),
    k = 0..intervals, of an exponential distribution with half-life `half_life_days` (the
    reference study: 19 intervals, half-life 730 days, last cut about 3,155 days).
    """
    if spacing == "uniform":
        return np.linspace(0.0, horizon_days, intervals + 1)
    if spacing == "exponential":
        k = np.arange(intervals + 1)
        return -half_life_days / math.log(2) * np.log1p(-k / (intervals + 1))
    raise InputError(f"unknown cut spacing {spacing!r}; valid spacings are {list(CUT_SPACINGS)}")


class BreslowBaseline:
    """Breslow estimate of the baseline cumulative hazard from training scores, times, events."""

    def __init__(self, score: np.ndarray, time: np.ndarray, event: np.ndarray):
        score = np.asarray(score, dtype=float)
        time, event = np.asarray(time, dtype=float), np.asarray(event).astype(int)
        self.centre = float(score.mean())
        hz = np.exp(np.clip(score - self.centre, -50, 50))
        times = np.unique(time[event == 1])
        # Risk-set sums in O(n log n): suffix sums of hz over patients sorted by time.
        order = np.argsort(time, kind="stable")
        suffix = np.cumsum(hz[order][::-1])[::-1]
        at_risk = suffix[np.searchsorted(time[order], times, side="left")] if len(times) else np.zeros(0)
        deaths = np.bincount(np.searchsorted(times, time[event == 1]), minlength=len(times)) if len(times) else np.zeros(0)
        self.times = times
        self.cumhaz = np.cumsum(deaths / at_risk) if len(times) else np.zeros(0)

    def state(self) -> dict:
        return {"centre": self.centre, "times": self.times.tolist(), "cumhaz": self.cumhaz.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> BreslowBaseline:
        baseline = cls.__new__(cls)
        baseline.centre = float(state["centre"])
        baseline.times = np.asarray(state["times"], dtype=float)
        baseline.cumhaz = np.asarray(state["cumhaz"], dtype=float)
        return baseline

    def cumulative_hazard(self, times: np.ndarray) -> np.ndarray:
        """H0(t) at `times` (0 before the first death)."""
        idx = np.searchsorted(self.times, np.asarray(times, dtype=float), side="right") - 1
        return np.where(idx >= 0, self.cumhaz[np.clip(idx, 0, None)] if len(self.cumhaz) else 0.0, 0.0)

    def survival(self, score: np.ndarray, times: np.ndarray) -> np.ndarray:
        """float [n, len(times)]: S(t | score) = exp(-H0(t) exp(score - centre))."""
        rel = np.exp(np.clip(np.asarray(score, dtype=float) - self.centre, -50, 50))
        return np.exp(-np.outer(rel, self.cumulative_hazard(times)))

    def log_cumulative_hazard(self, score: np.ndarray, reference: float = ONE_YEAR) -> np.ndarray:
        """log H(reference | score) = score - centre + log H0(reference): free of the score's offset.

        If no training death happened by `reference`, the first death time is used instead."""
        if not len(self.times):
            raise InputError("the training patients of this fold have no death: no baseline hazard")
        h0 = float(self.cumulative_hazard(np.array([max(reference, self.times[0])]))[0])
        return np.asarray(score, dtype=float) - self.centre + math.log(h0)


class SurvivalHead:
    """Base: subclasses define `out_features`, `loss` and the prediction methods.

    A head also says which endpoint it models (``os``: the survival time; ``1yr``: death by day
    365) and which training parameters configure it (`options`: `TrainConfig` fields, flat like
    every training parameter so that a search space can search them), and is built from those
    by `from_options`. Registered in `HEADS`.
    """

    name = ""
    endpoint = "os"
    options: tuple[str, ...] = ()
    out_features = 1

    @classmethod
    def from_options(cls, **options) -> SurvivalHead:
        return cls(**options)

    def prepare(self, time: np.ndarray, event: np.ndarray) -> None:
        """Learn what the loss needs from the fold's training outcomes (before training)."""

    def loss(self, outputs: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, outputs: np.ndarray) -> np.ndarray:
        """Within-model ordering of patients (higher = worse); may carry a fold-specific offset."""
        return outputs[:, 0].astype(float)

    def risk(self, outputs: np.ndarray) -> np.ndarray:
        """The DPI, comparable across folds (after `fit`)."""
        return self.score(outputs)

    def score_tensor(self, outputs: torch.Tensor) -> torch.Tensor:
        """`score` in torch, differentiable [n]: what Grad-CAM explains. The DPI is an increasing
        affine function of it (`risk`), so its map is the DPI's."""
        return outputs[:, 0]

    def fit(self, train_outputs: np.ndarray, time: np.ndarray, event: np.ndarray) -> None:
        """Fit what predictions need from the training fold (a baseline hazard)."""
        self.baseline = BreslowBaseline(self.score(train_outputs), time, event)

    def state(self) -> dict:
        """What `fit` learned, as plain numbers (saved with the fold model)."""
        baseline = getattr(self, "baseline", None)
        return {"baseline": baseline.state() if baseline is not None else None}

    def load_state(self, state: dict) -> None:
        if state.get("baseline") is not None:
            self.baseline = BreslowBaseline.from_state(state["baseline"])

    def survival(self, outputs: np.ndarray, times: np.ndarray) -> np.ndarray:
        return self.baseline.survival(self.score(outputs), times)

    def surv_365(self, outputs: np.ndarray) -> np.ndarray:
        return self.survival(outputs, np.array([ONE_YEAR]))[:, 0]

    def reset(self) -> None:
        """Forget state carried between batches (start of an epoch)."""


class CoxHead(SurvivalHead):
    name = "cox"
    options = ("cox_memory",)

    @classmethod
    def from_options(cls, cox_memory: int = 0) -> CoxHead:
        return cls("efron", cox_memory)

    def __init__(self, ties: str = "efron", memory: int = 0):
        self.ties = ties
        self.memory = memory
        self._bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def loss(self, outputs, time, event):
        log_hz = outputs[:, 0].float()
        n = log_hz.shape[0]
        if self.memory:
            # Stale predictions break the likelihood's shift invariance (raising the whole batch
            # against the memory would lower the loss and the scale would drift): centre both.
            log_hz = log_hz - log_hz.mean()
        if self.memory and self._bank is not None:
            bank_hz, bank_time, bank_event = self._bank
            loss = cox_nll(torch.cat([log_hz, bank_hz]), torch.cat([event, bank_event]),
                           torch.cat([time, bank_time]), self.ties, n_loss=n)
        else:
            loss = cox_nll(log_hz, event, time, self.ties)
        if self.memory:
            new = (log_hz.detach(), time.detach(), event.detach())
            if self._bank is not None:
                new = tuple(torch.cat([a, b])[: self.memory] for a, b in zip(new, self._bank))
            self._bank = new
        return loss

    def risk(self, outputs):
        return self.baseline.log_cumulative_hazard(self.score(outputs))

    def reset(self) -> None:
        self._bank = None


class LogisticHazardHead(SurvivalHead):
    name = "logistic_hazard"
    options = ("intervals", "horizon_days", "cut_spacing")

    @classmethod
    def from_options(cls, intervals: int = 19, horizon_days: float = 1825.0,
                     cut_spacing: str = "uniform") -> LogisticHazardHead:
        return cls(logistic_hazard_cuts(intervals, horizon_days, cut_spacing))

    def __init__(self, cuts: np.ndarray):
        self.cuts = np.asarray(cuts, dtype=float)
        self.transform = LabTransDiscreteTime(self.cuts)
        self.out_features = len(self.cuts)

    def loss(self, outputs, time, event):
        interval, ev = self.transform.transform(time.detach().cpu().numpy().astype(float), event.detach().cpu().numpy())
        return logistic_hazard_nll(outputs.float(), torch.as_tensor(interval, device=outputs.device),
                                   torch.as_tensor(ev, device=outputs.device))

    def _curve(self, outputs: np.ndarray) -> np.ndarray:
        hazard = 1.0 / (1.0 + np.exp(-np.clip(outputs.astype(float), -50, 50)))
        return np.cumprod(1.0 - hazard, axis=1)  # S at each cut

    def fit(self, train_outputs, time, event) -> None:
        pass

    def survival(self, outputs, times):
        curve = self._curve(outputs)
        return np.stack([np.interp(times, self.cuts, row) for row in curve])

    def score(self, outputs):
        curve = self._curve(outputs)
        return -np.trapezoid(np.concatenate([np.ones((len(curve), 1)), curve[:, 1:]], axis=1), self.cuts, axis=1)

    def score_tensor(self, outputs: torch.Tensor) -> torch.Tensor:
        """Minus the restricted mean survival time to the last cut (the DPI), differentiable."""
        curve = torch.cumprod(1.0 - torch.sigmoid(outputs.float().clamp(-50, 50)), dim=1)
        ones = torch.ones(len(curve), 1, dtype=curve.dtype, device=curve.device)
        cuts = torch.as_tensor(self.cuts, dtype=curve.dtype, device=curve.device)
        return -torch.trapezoid(torch.cat([ones, curve[:, 1:]], dim=1), cuts, dim=1)


class BinaryHead(SurvivalHead):
    name = "binary"
    endpoint = "1yr"

    def __init__(self, horizon: float = ONE_YEAR):
        self.horizon = horizon
        self._censoring: CensoringKM | None = None

    def prepare(self, time, event) -> None:
        self._censoring = CensoringKM(time, event)

    def weights(self, time: np.ndarray, event: np.ndarray) -> np.ndarray:
        """IPCW weight of each patient's 1-year status (0 when censored before the horizon)."""
        if self._censoring is None:
            raise InputError("the binary head needs prepare(time, event) on the training patients first")
        time, event = np.asarray(time, dtype=float), np.asarray(event).astype(bool)
        death = event & (time <= self.horizon)
        survivor = time >= self.horizon
        # Left limits G(t-): a patient is observed at t when censoring happens at t or later.
        seen_at = np.nextafter(np.where(death, time, self.horizon), -np.inf)
        g = self._censoring(seen_at)
        known = death | survivor
        out = np.zeros(time.shape[0])
        out[known] = 1.0 / np.maximum(g[known], 1e-3)
        return out

    def loss(self, outputs, time, event):
        t, e = time.detach().cpu().numpy(), event.detach().cpu().numpy()
        weight = torch.as_tensor(self.weights(t, e), dtype=torch.float32, device=outputs.device)
        label = ((event == 1) & (time <= self.horizon)).float()
        return binary_nll(outputs[:, 0].float(), label, weight)

    def surv_365(self, outputs):
        return 1.0 / (1.0 + np.exp(np.clip(outputs[:, 0].astype(float), -50, 50)))

    def survival(self, outputs, times):
        """S(t): the shape of the fold's Breslow baseline, scaled so that S(365) is the head's own
        probability of being alive at 1 year (`surv_365`): the Brier score at 365 days and the IBS
        then judge one survival prediction, not two."""
        alive = np.clip(self.surv_365(outputs), 1e-12, 1.0)
        h0 = self.baseline.cumulative_hazard(np.asarray(times, dtype=float))
        at_horizon = float(self.baseline.cumulative_hazard(np.array([self.horizon]))[0])
        if at_horizon <= 0:  # no training death by the horizon: no shape to scale
            return np.repeat(alive[:, None], len(np.atleast_1d(times)), axis=1)
        return np.exp(np.outer(np.log(alive), h0 / at_horizon))


HEADS: dict[str, type[SurvivalHead]] = {head.name: head for head in (CoxHead, LogisticHazardHead, BinaryHead)}
HEAD_OPTIONS = tuple(dict.fromkeys(option for head in HEADS.values() for option in head.options))


def build_head(name: str, /, **options) -> SurvivalHead:
    """A head by name (one of `HEADS`), from its options; options of other heads are ignored, so
    a whole training configuration's values may be passed."""
    if name not in HEADS:
        raise InputError(f"unknown head {name!r}; valid heads are {list(HEADS)}")
    head = HEADS[name]
    return head.from_options(**{k: v for k, v in options.items() if k in head.options})
