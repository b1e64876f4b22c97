"""Losses against reference implementations, with hypothesis invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from pycox.models.loss import cox_ph_loss

from trainables.heads import BreslowBaseline, build_head
from trainables.losses import binary_nll, cox_nll


def _brute_force(log_hz, event, time, ties):
    """Textbook partial log-likelihood, one event time at a time."""
    total = 0.0
    for t in np.unique(time[event == 1]):
        tied = (time == t) & (event == 1)
        d = tied.sum()
        risk = np.exp(log_hz[time >= t]).sum()
        tie = np.exp(log_hz[tied]).sum()
        total += log_hz[tied].sum()
        for l in range(d):
            total -= np.log(risk - (l / d) * tie) if ties == "efron" else np.log(risk)
    return -total


def test_efron_matches_lifelines_on_rossi():
    """Rossi has heavily tied weeks: the fitted model's log-likelihood must be reproduced."""
    df = load_rossi()
    fitter = CoxPHFitter().fit(df, "week", "arrest")
    eta = df.drop(columns=["week", "arrest"]).to_numpy(float) @ fitter.params_.to_numpy()
    loss = cox_nll(torch.tensor(eta), torch.tensor(df["arrest"].to_numpy()), torch.tensor(df["week"].to_numpy(float)),
                   ties="efron", reduction="sum")
    assert -loss.item() == pytest.approx(fitter.log_likelihood_, abs=1e-6)


def test_breslow_without_ties_matches_pycox():
    rng = np.random.default_rng(0)
    time, event, eta = rng.permutation(200).astype(float) + 1, (rng.random(200) < 0.6).astype(float), rng.normal(size=200)
    ours = cox_nll(torch.tensor(eta), torch.tensor(event), torch.tensor(time), ties="breslow", reduction="sum")
    theirs = cox_ph_loss(torch.tensor(eta), torch.tensor(time), torch.tensor(event)) * event.sum()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)  # pycox adds eps=1e-7 inside its log


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_ties_match_textbook_formula(ties):
    rng = np.random.default_rng(1)
    time = rng.integers(1, 8, size=40).astype(float)
    event = (rng.random(40) < 0.7).astype(float)
    eta = rng.normal(size=40)
    ours = cox_nll(torch.tensor(eta), torch.tensor(event), torch.tensor(time), ties=ties, reduction="sum")
    assert ours.item() == pytest.approx(_brute_force(eta, event, time, ties), rel=1e-10)


def test_no_event_and_single_sample_give_finite_zero_with_gradient():
    log_hz = torch.randn(5, requires_grad=True)
    loss = cox_nll(log_hz, torch.zeros(5), torch.arange(5.0))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(log_hz.grad).all()
    single = torch.randn(1, requires_grad=True)
    assert cox_nll(single, torch.ones(1), torch.ones(1)).item() == 0.0


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_large_spread_of_log_hazards_stays_finite_in_float32(ties):
    """A spread over ~100 used to underflow exp() and give log(0) = -inf for the last at risk."""
    log_hz = torch.tensor([0.0, -200.0, -150.0, -150.0], requires_grad=True)
    time, event = torch.tensor([1.0, 2.0, 3.0, 3.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    loss = cox_nll(log_hz, event, time, ties=ties, reduction="sum")
    exact = _brute_force(log_hz.detach().double().numpy(), event.numpy(), time.numpy(), ties)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(exact, abs=1e-5)
    loss.backward()
    assert torch.isfinite(log_hz.grad).all()


@st.composite
def survival_batches(draw):
    """Batches that always contain at least one event (as torchsurv's strategies do)."""
    n = draw(st.integers(1, 30))
    time = draw(st.lists(st.integers(1, 10), min_size=n, max_size=n))
    event = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    event[draw(st.integers(0, n - 1))] = True
    log_hz = draw(st.lists(st.floats(-20, 20), min_size=n, max_size=n))
    return (torch.tensor(log_hz, dtype=torch.float64), torch.tensor(event, dtype=torch.float64),
            torch.tensor(time, dtype=torch.float64))


@settings(max_examples=200, deadline=None)
@given(survival_batches(), st.sampled_from(["efron", "breslow"]), st.randoms())
def test_cox_invariants(batch, ties, random):
    log_hz, event, time = batch
    loss = cox_nll(log_hz, event, time, ties=ties)
    assert torch.isfinite(loss) and loss.item() >= -1e-9
    perm = torch.tensor(random.sample(range(len(time)), len(time)))
    assert cox_nll(log_hz[perm], event[perm], time[perm], ties=ties).item() == pytest.approx(loss.item(), abs=1e-8)
    assert cox_nll(log_hz + 7.5, event, time, ties=ties).item() == pytest.approx(loss.item(), abs=1e-8)


def test_cox_memory_enlarges_risk_sets_without_scale_drift():
    time, event = torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 0, 1, 0])
    head = build_head("cox", cox_memory=8)
    head.loss(torch.randn(6, 1), torch.arange(1.0, 7.0), torch.ones(6))  # fills the memory
    bank = head._bank
    assert bank[0].shape[0] == 6
    out = torch.randn(4, 1)
    with_memory = head.loss(out, time, event)
    head._bank = bank
    shifted = head.loss(out + 100.0, time, event)
    assert shifted.item() == pytest.approx(with_memory.item(), abs=1e-5), "raising the batch does not pay"
    assert head._bank[0].shape[0] == 8, "memory keeps the most recent samples only"
    plain = build_head("cox").loss(out, time, event)
    assert with_memory.item() > plain.item(), "memory entries join the risk sets"


def test_logistic_hazard_head_discretises_like_pycox_and_gives_curves():
    head = build_head("logistic_hazard", intervals=19, horizon_days=1825)
    assert head.out_features == 20 and head.cuts[1] == pytest.approx(1825 / 19)
    outputs = torch.zeros(3, 20, requires_grad=True)
    loss = head.loss(outputs, torch.tensor([10.0, 400, 3000]), torch.tensor([1.0, 0, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    curves = head.survival(np.zeros((3, 20)), np.array([0.0, 365, 730, 5000]))
    assert (np.diff(curves, axis=1) <= 0).all() and curves[0, 0] == pytest.approx(0.5)
    worse = head.risk(np.full((1, 20), 1.0))
    better = head.risk(np.full((1, 20), -1.0))
    assert worse > better


def test_binary_head_and_breslow_baseline():
    loss = binary_nll(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(np.log(2))
    head = build_head("binary")
    assert head.surv_365(np.array([[0.0], [2.0]])) == pytest.approx([0.5, 1 / (1 + np.exp(2))])
    # Breslow with risk 0: S(t) equals the Kaplan-Meier curve's Nelson-Aalen analogue.
    time, event = np.array([1.0, 2, 2, 3, 4]), np.array([1, 1, 0, 1, 0])
    baseline = BreslowBaseline(np.zeros(5), time, event)
    expected = np.exp(-np.array([1 / 5, 1 / 5 + 1 / 4, 1 / 5 + 1 / 4 + 1 / 2]))
    assert baseline.survival(np.zeros(1), np.array([1.0, 2.5, 3.5]))[0] == pytest.approx(expected)
