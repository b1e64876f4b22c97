"""Report figures (matplotlib, Agg): Kaplan-Meier by DPI group, calibration, search diagnostics."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from lifelines import KaplanMeierFitter  # noqa: E402
from lifelines.plotting import add_at_risk_counts  # noqa: E402
from lifelines.statistics import logrank_test  # noqa: E402

from analysis.oracle import LABELS  # noqa: E402


def km_by_dpi(time, event, dpi, cutoff: float, title: str, path: Path) -> float:
    """Kaplan-Meier curves of DPI <= cutoff (low) vs > cutoff (high) with numbers at risk.

    The cut-off is given (fixed on development data); returns the log-rank p-value.
    """
    time, event, dpi = (np.asarray(a, dtype=float) for a in (time, event, dpi))
    high = dpi > cutoff
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    fitters = []
    for mask, label, colour in ((~high, "low DPI", "tab:blue"), (high, "high DPI", "tab:red")):
        km = KaplanMeierFitter(label=f"{label} (n={int(mask.sum())})")
        if mask.sum() > 0:
            km.fit(time[mask] / 30.44, event[mask])
            km.plot_survival_function(ax=ax, ci_show=True, color=colour)
            fitters.append(km)
    p = float(logrank_test(time[high], time[~high], event[high], event[~high]).p_value) if high.any() and (~high).any() else float("nan")
    ax.set(xlabel="months", ylabel="overall survival", title=f"{title}\nlog-rank p = {p:.3g} (cut-off {cutoff:.2f})",
           ylim=(0, 1.02))
    if fitters:
        add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return p


def calibration_plot(table: pd.DataFrame, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="ideal")
    ax.errorbar(table["predicted"], table["observed"],
                yerr=[table["observed"] - table["observed_low"], table["observed_high"] - table["observed"]],
                fmt="o-", capsize=3, label="risk quintiles (KM, 95% CI)")
    ax.set(xlabel="predicted 1-year survival", ylabel="observed 1-year survival (Kaplan-Meier)", xlim=(0, 1),
           ylim=(0, 1), title=title)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def search_diagnostics(trials: pd.DataFrame, params: dict, title: str, path: Path) -> None:
    """Optimisation history, parameter importances and parallel coordinates of one cell.

    `trials`: one row per trial in start order, columns ``value`` (the pooled out-of-fold C-index
    of a finished trial, NaN otherwise), ``stopped_value`` (the folds' mean validation C-index at
    the last epoch reported: for a trial ASHA stopped, a different, per-epoch quantity) and the
    searched parameters; `params`: their names -> the space's distributions (`parameter_importances`).
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    order = np.arange(1, len(trials) + 1)
    finished = trials["value"].notna()
    ax.scatter(order[finished], trials.loc[finished, "value"], label="finished: pooled out-of-fold C",
               color="tab:blue")
    ax.scatter(order[~finished], trials.loc[~finished, "stopped_value"],
               label="stopped by ASHA: folds' mean validation C\nat that epoch (not comparable)", color="tab:grey",
               marker="x")
    best = trials["value"].fillna(-np.inf).cummax().replace(-np.inf, np.nan)
    ax.step(order, best, where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel="C-index", title="optimisation history")
    ax.legend(fontsize=7)
    importances = parameter_importances(trials, params)
    ax = axes[1]
    if importances:
        names = list(importances)
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title="parameter importances")
    else:
        ax.text(0.5, 0.5, "too few finished trials\nfor importances", ha="center", va="center")
        ax.set_axis_off()
    ax = axes[2]
    score = trials["value"].fillna(trials["stopped_value"])
    normalised = []
    for name in params:
        column = trials[name]
        if column.dtype == object:
            codes = {v: i for i, v in enumerate(sorted(column.astype(str).unique()))}
            values = column.astype(str).map(codes).astype(float) / max(1, len(codes) - 1)
        else:
            values = np.log10(column.astype(float)) if (column.astype(float) > 0).all() and column.max() / max(column.min(), 1e-30) > 20 else column.astype(float)
            span = values.max() - values.min()
            values = (values - values.min()) / span if span > 0 else values * 0 + 0.5
        normalised.append(values.to_numpy())
    cmap = plt.get_cmap("viridis")
    low, high = np.nanmin(score), np.nanmax(score)
    for i in range(len(trials)):
        colour = cmap(0.5 if high == low else (score.iloc[i] - low) / (high - low))
        ax.plot(range(len(params)), [v[i] for v in normalised], color=colour, alpha=0.8)
    ax.set_xticks(range(len(params)), params, rotation=30, fontsize=7)
    ax.set(title="parallel coordinates (colour: C-index as in the history)", ylabel="normalised value")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parameter_importances(trials: pd.DataFrame, params: dict) -> dict[str, float]:
    """Optuna's fANOVA importances from the finished trials (empty if fewer than 3). `params`: name
    -> the space's distribution (`search_spaces` LogUniform, Uniform, Choice), so that a
    log-uniform learning rate is split on its log scale as the search drew it; None where the space
    is unknown (the report made without the study's space file): then guessed from the values."""

    import optuna

    done = trials[trials["value"].notna()]
    if len(done) < 3:
        return {}
    distributions = {name: optuna_distribution(space, trials[name]) for name, space in params.items()}
    study = optuna.create_study(direction="maximize")
    for _, row in done.iterrows():
        values = {n: _as_choice(row[n], distributions[n]) for n in params}
        study.add_trial(optuna.trial.create_trial(params=values, distributions=distributions, value=float(row["value"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return dict(optuna.importance.get_param_importances(study))
        except (RuntimeError, ValueError):
            return {}


def optuna_distribution(space, column: pd.Series):
    """The Optuna distribution of a searched parameter: from its space (widened to hold every value
    the trials ran, the reference recipe's included), or guessed from the values where unknown."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from search_spaces._space import Choice, LogUniform, Uniform

    if isinstance(space, Choice):
        return CategoricalDistribution(list(dict.fromkeys([*space.values, *(
            v for v in column.unique().tolist() if not any(_same(v, c) for c in space.values))])))
    if isinstance(space, (LogUniform, Uniform)):
        values = column.astype(float)
        return FloatDistribution(min(space.low, float(values.min())), max(space.high, float(values.max())),
                                 log=isinstance(space, LogUniform))
    if column.dtype == object or column.nunique() <= 3:
        return CategoricalDistribution(sorted(column.unique().tolist(), key=str))
    low, high = float(column.min()), float(column.max())
    return FloatDistribution(low, high if high > low else low + 1e-12)


def _same(value, choice) -> bool:
    """A value read back from MLflow (a float or a string) is this choice of the space."""
    return value == choice or str(value) == str(choice)


def _as_choice(value, distribution):
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        return next(c for c in distribution.choices if _same(value, c))
    return value


COMPARISON_FILE = "cell_comparison.png"


def cell_forest(rows: pd.DataFrame, oracles: dict[str, dict[str, float]], title: str, path: Path) -> None:
    """Forest plot of each cell's headline C-index with its interval, one panel per task.

    `rows`: columns ``task``, ``label`` (the cell as people read it), ``value``, ``low``, ``high``
    (NaN where a cell has no estimate). `oracles`: per task, the C-index of the synthetic cohort's
    oracles (``image_content``: what the images can tell; ``total``: the true total predictor,
    `analysis.oracle`), drawn as vertical lines: what there was to learn.
    """
    tasks = list(dict.fromkeys(rows["task"]))
    heights = [max(1, int((rows["task"] == t).sum())) for t in tasks]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(7.0, 1.2 + 0.42 * sum(heights) + 0.5 * len(tasks)), sharex=True,
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    styles = {"image_content": ("tab:orange", "--", LABELS["image_content"]), "total": ("tab:green", ":", LABELS["total"])}
    for ax, task in zip(axes[:, 0], tasks):
        part = rows[rows["task"] == task].reset_index(drop=True)
        y = np.arange(len(part))[::-1]
        known = part["value"].notna().to_numpy()
        ax.errorbar(part["value"][known], y[known], xerr=[(part["value"] - part["low"])[known],
                                                            (part["high"] - part["value"])[known]],
                    fmt="o", color="tab:blue", ecolor="tab:blue", capsize=3)
        for value, yy in zip(part["value"][known], y[known]):
            ax.annotate(f"{value:.3f}", (value, yy), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        ax.set_yticks(y, part["label"], fontsize=8)
        ax.axvline(0.5, color="grey", lw=0.8)
        for kind, (colour, dash, label) in styles.items():
            if task in oracles and kind in oracles[task]:
                ax.axvline(oracles[task][kind], color=colour, ls=dash, lw=1.2, label=f"{label} {oracles[task][kind]:.3f}")
        ax.set_title(task, fontsize=9, loc="left")
        ax.set_ylim(-0.7, len(part) - 0.3)
        if task in oracles:
            ax.legend(fontsize=7, loc="best", framealpha=0.9)
    axes[-1, 0].set_xlabel("C-index (headline: BBC-CV, 95% interval)")
    fig.suptitle(title, fontsize=10, parse_math=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
