"""Survival losses as pure functions on tensors.

- `cox_nll`: negative Cox partial log-likelihood with Efron or Breslow ties;
- `logistic_hazard_nll`: discrete-time logistic-hazard (nnet-survival) likelihood, pycox's
  implementation;
- `binary_nll`: 1-year death as a binary outcome (binary cross-entropy on logits, optionally
  weighted, e.g. by inverse probability of censoring).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pycox.models.loss import nll_logistic_hazard


def _check(log_hz: torch.Tensor, event: torch.Tensor, time: torch.Tensor) -> None:
    if not log_hz.shape[0] == event.shape[0] == time.shape[0]:
        raise ValueError(f"Inputs 'log_hz', 'event' and 'time' must have the same length, got "
                         f"{log_hz.shape[0]}, {event.shape[0]}, {time.shape[0]}.")
    if (time < 0).any():
        raise ValueError("Input 'time' must be non-negative.")


def cox_nll(log_hz: torch.Tensor, event: torch.Tensor, time: torch.Tensor, ties: str = "efron",
            reduction: str = "mean", n_loss: int | None = None) -> torch.Tensor:
    """Negative Cox partial log-likelihood.

    Parameters
    ----------
    log_hz : float [n] (or [n, 1])
        Log relative hazards (the deep prognostic index).
    event : 0/1 [n]
    time : float [n], days
    ties : "efron" | "breslow"
    reduction : "mean" (per event) | "sum"
    n_loss
        Only the first `n_loss` samples contribute event terms; the rest only enlarge the risk
        sets (as censored at their time). Used for the risk-set memory of small batches.

    Returns
    -------
    Scalar tensor; exactly 0 (with a gradient) when there is no event.
    """
    log_hz = log_hz.reshape(-1)
    event = event.reshape(-1).to(log_hz.dtype)
    time = time.reshape(-1).to(log_hz.dtype)
    _check(log_hz, event, time)
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    if n_loss is not None:
        event = torch.cat([event[:n_loss], torch.zeros_like(event[n_loss:])])
    if event.sum() == 0:
        return log_hz.sum() * 0.0
    event_times = torch.unique(time[event == 1])  # [k]
    at_risk = time[None, :] >= event_times[:, None]  # [k, n]
    tied_event = (time[None, :] == event_times[:, None]) & (event[None, :] == 1)
    # Denominators in log space: with a spread of log hazards over ~100 (float32), exp() of the
    # lowest underflows to 0 and a last-at-risk event would give log(0); logsumexp cannot.
    minus_inf = torch.tensor(-torch.inf, dtype=log_hz.dtype, device=log_hz.device)
    log_risk_sum = torch.logsumexp(torch.where(at_risk, log_hz[None, :], minus_inf), dim=1)  # [k]
    log_tie_sum = torch.logsumexp(torch.where(tied_event, log_hz[None, :], minus_inf), dim=1)  # [k]
    d = tied_event.sum(dim=1).to(log_hz.dtype)  # events per time [k]
    # Each event's rank l (0..d-1) within its tie group, for Efron's correction.
    group = torch.argmax(tied_event.to(torch.uint8), dim=0)  # group of each sample (valid for events)
    events_idx = torch.nonzero(event == 1).reshape(-1)
    g = group[events_idx]
    order = torch.argsort(g, stable=True)
    sorted_g = g[order]
    first = torch.searchsorted(sorted_g, sorted_g)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - first
    log_denominator = log_risk_sum[g]
    if ties == "efron":
        # log(R - (l/d) T) = log R + log1p(-(l/d) T/R); T <= R and l/d < 1 keep the argument > 0.
        ratio = torch.exp(log_tie_sum[g] - log_risk_sum[g])
        log_denominator = log_denominator + torch.log1p(-rank.to(log_hz.dtype) / d[g] * ratio)
    loglik = log_hz[events_idx] - log_denominator
    total = -loglik.sum()
    return total / len(events_idx) if reduction == "mean" else total


def logistic_hazard_nll(phi: torch.Tensor, interval: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Logistic-hazard negative log-likelihood (Kvamme & Borgan 2019; pycox), mean over samples.

    Parameters
    ----------
    phi : float [n, m]  logits of the hazard in each of m discrete times
    interval : int [n]  index of each sample's discrete time (pycox `LabTransDiscreteTime`)
    event : 0/1 [n]
    """
    return nll_logistic_hazard(phi, interval.long(), event.float())


def binary_nll(logit: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of death within one year (label 1) from logits.

    Parameters
    ----------
    logit, label : float [n]
    weight : float [n] >= 0, optional
        Per-sample weights (IPCW); the loss is their weighted mean, exactly 0 (with a gradient)
        when every weight is 0. None: the plain mean.
    """
    logit = logit.reshape(-1)
    label = label.reshape(-1).to(logit.dtype)
    if weight is None:
        return F.binary_cross_entropy_with_logits(logit, label)
    weight = weight.reshape(-1).to(logit.dtype)
    if weight.shape != logit.shape:
        raise ValueError(f"Input 'weight' has {weight.shape[0]} values but 'logit' has {logit.shape[0]}.")
    if (weight < 0).any():
        raise ValueError("Input 'weight' must be non-negative.")
    total = weight.sum()
    losses = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
    return (losses * weight).sum() / total if total > 0 else logit.sum() * 0.0
