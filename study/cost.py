"""What a study will cost, before it runs (``python -m study.run --dry-run``).

Trials = cells x configurations; each trains K folds for up to E epochs. ASHA (grace g,
reduction factor r) stops trials at rungs g, g r, g r^2, ... below E, keeping the best 1/r at
each, so a trial trains on average g + sum_k (m_(k+1) - m_k) / r^(k+1) epochs (m_k the rungs,
m_last = E): `asha_epochs`. This is the expectation of ASHA's promotion rule when trials arrive
in random order; asynchronous promotion lets a few more through early, so the estimate is a
lower bound by a few percent.

A fold-epoch's time is `--epoch-seconds` when given (measure it: one trial's ``train_seconds``
/ its ``fold_epochs``, or `benchmarks/gpu.sh`), else the training patients of a fold over an
assumed throughput (`ASSUMED_VOLUMES_PER_SECOND`, one full-size 3D volume forward and backward
plus the validation pass, of the order a current data-centre GPU reaches with bf16 on
120 x 120 x 78 volumes; a guess to be replaced by a measurement). A trial with G >= 1 GPUs
trains G folds at a time, one per GPU; with a fraction f of a GPU its fold-epoch occupies f.
"""

from __future__ import annotations

ASSUMED_VOLUMES_PER_SECOND = 300.0


def asha_epochs(epochs: int, grace: int, reduction: int) -> float:
    """Expected epochs per trial under ASHA (see the module docstring); `epochs` without pruning."""
    rungs = []
    milestone = grace
    while milestone < epochs:
        rungs.append(milestone)
        milestone *= reduction
    rungs.append(epochs)
    expected = float(rungs[0])
    for k in range(len(rungs) - 1):
        expected += (rungs[k + 1] - rungs[k]) / reduction ** (k + 1)
    return expected


def estimate(config, patients: dict[str, int], epoch_seconds: float | None = None,
             cluster_gpus: float | None = None) -> list[str]:
    """Lines of the cost estimate: trials, fold-epochs, GPU-hours without and with ASHA, wall time."""
    protocol = config.protocol
    trials = config.trials
    folds, epochs = protocol.folds, protocol.epochs
    per_trial_pruned = asha_epochs(epochs, protocol.grace_epochs, protocol.reduction_factor) if config.pruning \
        else float(epochs)
    if epoch_seconds is None:
        seconds = {task: n * (folds - 1) / folds / ASSUMED_VOLUMES_PER_SECOND * 1.2 for task, n in patients.items()}
        source = (f"assumed: a fold's training patients at {ASSUMED_VOLUMES_PER_SECOND:g} volumes/s, +20% for "
                  "validation; measure it and pass --epoch-seconds")
    else:
        seconds = {task: epoch_seconds for task in patients}
        source = "--epoch-seconds"
    share = config.gpus_per_trial if 0 < config.gpus_per_trial < 1 else 1.0
    gpu_seconds_full = sum(seconds[cell.task] * share * folds * epochs * config.samples(cell) for cell in config.cells()
                           if cell.task in patients)
    gpu_seconds = gpu_seconds_full * per_trial_pruned / epochs
    lines = [f"  cost: {trials} trials x {folds} folds x up to {epochs} epochs = {trials * folds * epochs:,} "
             "fold-epochs; "
             + (f"with ASHA about {per_trial_pruned:.0f} epochs per trial, {trials * folds * per_trial_pruned:,.0f} "
                "fold-epochs" if config.pruning else "no pruning"),
             "  fold-epoch time: " + ", ".join(f"{t} {s:.1f} s" for t, s in seconds.items()) + f" ({source})",
             f"  GPU-hours: {gpu_seconds_full / 3600:,.1f} without ASHA, {gpu_seconds / 3600:,.1f} with it"]
    if config.gpus_per_trial == 0:
        lines[-1] = lines[-1].replace("GPU-hours", "device-hours (--gpus-per-trial 0: on CPUs, far slower)")
    if cluster_gpus:
        lines.append(f"  wall time on this cluster's {cluster_gpus:g} GPUs, all busy: about "
                     f"{gpu_seconds / cluster_gpus / 3600:,.1f} h")
    else:
        lines.append(f"  wall time with every GPU busy: about {gpu_seconds / 8 / 3600:,.1f} h on 8 GPUs, "
                     f"{gpu_seconds / 24 / 3600:,.1f} h on 24 (--address: the cluster's own)")
    return lines
