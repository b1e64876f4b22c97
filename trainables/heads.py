"""Survival heads: what the network outputs mean, their loss, and their predictions.

Every head turns network outputs into a risk score (the deep prognostic index, higher = worse)
and survival probabilities at any times, so ``surv_365`` exists for every head:

- ``cox``: one output, the log relative hazard. Loss: Cox partial likelihood (Efron ties).
  Survival: Breslow baseline hazard fitted on the training fold.
  Small batches of 3D volumes make Cox risk sets tiny (a batch of one gives zero loss), so the
  head keeps a *risk-set memory*: the detached predictions, times and events of the last
  `memory` training samples join each batch's risk sets as censored entries (they enlarge the
  denominators; only the batch's own events add terms). Batch and memory are each centred, as
  stale predictions would otherwise let the scale drift. Chosen over gradient accumulation,
  which cannot help a loss that does not decompose over samples.
- ``logistic_hazard``: one output per discrete time (pycox cuts; the reference study used 19
  intervals over 5 years). Survival: product of (1 - hazard), linear between cuts. Risk: minus
  the restricted mean survival time up to the last cut (days).
- ``binary``: one output, the logit of death within 365 days (1-year endpoint; patients censored
  before 365 days are not in that cohort). surv_365 = 1 - sigmoid(logit); the curve at other
  times comes from a Breslow baseline on the logit, fitted on the training fold.
"""

from __future__ import annotations

import numpy as np
import torch
from pycox.preprocessing.label_transforms import LabTransDiscreteTime

from datasets.errors import InputError
from trainables.losses import binary_nll, cox_nll, logistic_hazard_nll

HEADS = ("cox", "logistic_hazard", "binary")
ONE_YEAR = 365.0


class BreslowBaseline:
    """Breslow estimate of the baseline cumulative hazard from training risks, times, events."""

    def __init__(self, risk: np.ndarray, time: np.ndarray, event: np.ndarray):
        risk = np.asarray(risk, dtype=float)
        self.centre = float(risk.mean())
        hz = np.exp(np.clip(risk - self.centre, -50, 50))
        times = np.unique(time[event == 1])
        at_risk = np.array([hz[time >= t].sum() for t in times])
        deaths = np.array([np.sum((time == t) & (event == 1)) for t in times])
        self.times = times
        self.cumhaz = np.cumsum(deaths / at_risk) if len(times) else np.zeros(0)

    def survival(self, risk: np.ndarray, times: np.ndarray) -> np.ndarray:
        """float [n, len(times)]: S(t | risk) = exp(-H0(t) exp(risk - centre))."""
        idx = np.searchsorted(self.times, np.asarray(times, dtype=float), side="right") - 1
        h0 = np.where(idx >= 0, self.cumhaz[np.clip(idx, 0, None)] if len(self.cumhaz) else 0.0, 0.0)
        rel = np.exp(np.clip(np.asarray(risk, dtype=float) - self.centre, -50, 50))
        return np.exp(-np.outer(rel, h0))


class SurvivalHead:
    """Base: subclasses define `out_features`, `loss` and the prediction methods."""

    name = ""
    out_features = 1

    def loss(self, outputs: torch.Tensor, time: torch.Tensor, event: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def risk(self, outputs: np.ndarray) -> np.ndarray:
        return outputs[:, 0].astype(float)

    def fit(self, train_outputs: np.ndarray, time: np.ndarray, event: np.ndarray) -> None:
        """Fit what predictions need from the training fold (a baseline hazard)."""
        self.baseline = BreslowBaseline(self.risk(train_outputs), time, event)

    def survival(self, outputs: np.ndarray, times: np.ndarray) -> np.ndarray:
        return self.baseline.survival(self.risk(outputs), times)

    def surv_365(self, outputs: np.ndarray) -> np.ndarray:
        return self.survival(outputs, np.array([ONE_YEAR]))[:, 0]

    def reset(self) -> None:
        """Forget state carried between batches (start of an epoch)."""


class CoxHead(SurvivalHead):
    name = "cox"

    def __init__(self, ties: str = "efron", memory: int = 0):
        self.ties = ties
        self.memory = memory
        self._bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def loss(self, outputs, time, event, label):
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

    def reset(self) -> None:
        self._bank = None


class LogisticHazardHead(SurvivalHead):
    name = "logistic_hazard"

    def __init__(self, intervals: int = 19, horizon_days: float = 5 * 365.0):
        self.cuts = np.linspace(0.0, horizon_days, intervals + 1)
        self.transform = LabTransDiscreteTime(self.cuts)
        self.out_features = len(self.cuts)

    def loss(self, outputs, time, event, label):
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

    def risk(self, outputs):
        curve = self._curve(outputs)
        return -np.trapezoid(np.concatenate([np.ones((len(curve), 1)), curve[:, 1:]], axis=1), self.cuts, axis=1)


class BinaryHead(SurvivalHead):
    name = "binary"

    def loss(self, outputs, time, event, label):
        return binary_nll(outputs[:, 0].float(), label)

    def surv_365(self, outputs):
        return 1.0 / (1.0 + np.exp(np.clip(outputs[:, 0].astype(float), -50, 50)))


def build_head(name: str, cox_memory: int = 0, ties: str = "efron", intervals: int = 19,
               horizon_days: float = 5 * 365.0) -> SurvivalHead:
    """A head by name (one of `HEADS`)."""
    if name == "cox":
        return CoxHead(ties, cox_memory)
    if name == "logistic_hazard":
        return LogisticHazardHead(intervals, horizon_days)
    if name == "binary":
        return BinaryHead()
    raise InputError(f"unknown head {name!r}; valid heads are {list(HEADS)}")
