"""Live progress of a study: every so often, one line for the study and one per running trial.

A full-size trial trains for hours; between its start and its end the study would otherwise say
nothing. Every `interval_s` seconds (30 on a terminal, 120 when the output is a log file or
``ray job logs``; ``STUDY_PROGRESS_S`` sets it) the study prints, as plain lines that read well
in a log::

    progress 14:03:10: 5 of 24 trials ended (3 finished, 2 pruned), 2 running; study ETA ~6 min
      densenet121/os_all/3a043fab  fold-epochs 34/60  mean val C 0.612  2m10s  ETA 1m40s

ETAs come from measured time per fold-epoch: a trial's is its remaining fold-epochs at its own
pace; the study's adds the trials not yet started at the average number of fold-epochs that
ended trials used (ASHA stops most early), spread over the trials running at once.
"""

from __future__ import annotations

import math
import os
import sys
import time

from ray import tune

from evaluation import metric_names as names
from search_spaces import Cell


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def default_interval() -> float:
    value = os.environ.get("STUDY_PROGRESS_S", "")
    try:
        if value and float(value) >= 0:
            return float(value)
    except ValueError:
        pass
    if value:
        print(f"  (STUDY_PROGRESS_S={value!r} is not a number of seconds >= 0: using the default)", flush=True)
    return 30.0 if sys.stdout.isatty() else 120.0


class Progress(tune.Callback):
    def __init__(self, total_trials: int, fold_epochs_per_trial: int, interval_s: float | None = None):
        self.total, self.per_trial = total_trials, fold_epochs_per_trial
        self.interval_s = default_interval() if interval_s is None else interval_s
        self._running: dict[str, dict] = {}
        self._ended: dict[str, str] = {}  # trial id -> finished / pruned / failed
        self._ended_fold_epochs: list[int] = []
        self._pace: list[float] = []  # seconds per fold-epoch of recent reports
        self._last_print = time.monotonic()

    def __getstate__(self):  # pickled into tuner.pkl: the counts start again on resume
        return {"total": self.total, "per_trial": self.per_trial, "interval_s": self.interval_s}

    def __setstate__(self, state):
        self.__init__(state["total"], state["per_trial"], state["interval_s"])

    def _state(self, trial) -> dict:
        now = time.monotonic()
        return self._running.setdefault(trial.trial_id, {"started": now, "at": now, "fold_epochs": 0,
                                                         "name": f"{Cell.of(trial.config).label}/{trial.trial_id}"})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._state(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        now = time.monotonic()
        state = self._state(trial)
        done = int(result.get(names.FOLD_EPOCHS.name, 0) or 0)
        if done > state["fold_epochs"]:
            if state["fold_epochs"]:
                self._pace = (self._pace + [(now - state["at"]) / (done - state["fold_epochs"])])[-50:]
            state.update(fold_epochs=done, at=now)
        state["cindex"] = result.get(names.EPOCH_CINDEX.name, math.nan)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, names.outcome(trial.last_result))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, names.FAILED_OUTCOME)

    def _end(self, trial, outcome: str) -> None:
        state = self._running.pop(trial.trial_id, None)
        self._ended[trial.trial_id] = outcome
        if state and state["fold_epochs"]:
            self._ended_fold_epochs.append(state["fold_epochs"])

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last_print >= self.interval_s:
            self._last_print = time.monotonic()
            for trial in trials:  # trials that ended before a resume are counted too
                if trial.status in ("TERMINATED", "ERROR") and trial.trial_id not in self._ended:
                    self._ended[trial.trial_id] = names.outcome(trial.last_result, trial.status == "ERROR")
                    self._running.pop(trial.trial_id, None)
            print("\n".join(self.lines()), flush=True)

    def lines(self) -> list[str]:
        now = time.monotonic()
        pace = sorted(self._pace)[len(self._pace) // 2] if self._pace else math.nan  # median s per fold-epoch
        counts = {o: list(self._ended.values()).count(o) for o in (names.FINISHED, names.PRUNED, names.FAILED_OUTCOME)}
        running_left = sum(max(0, self.per_trial - s["fold_epochs"]) for s in self._running.values())
        waiting = max(0, self.total - len(self._ended) - len(self._running))
        typical = (sum(self._ended_fold_epochs) / len(self._ended_fold_epochs) if self._ended_fold_epochs
                   else self.per_trial)
        at_once = max(1, len(self._running))
        study_eta = (running_left + waiting * typical) * pace / at_once
        ended = ", ".join(f"{n} {o}" for o, n in counts.items() if n)
        lines = [f"progress {time.strftime('%H:%M:%S')}: {len(self._ended)} of {self.total} trials ended"
                 + (f" ({ended})" if ended else "") + f", {len(self._running)} running; study ETA ~{_duration(study_eta)}"]
        for state in sorted(self._running.values(), key=lambda s: s["started"]):
            left = max(0, self.per_trial - state["fold_epochs"])
            cindex = state.get("cindex", math.nan)
            own = (now - state["started"]) / state["fold_epochs"] if state["fold_epochs"] else pace
            lines.append(f"  {state['name']}  fold-epochs {state['fold_epochs']}/{self.per_trial}  "
                         f"mean val C {f'{cindex:.3f}' if math.isfinite(cindex) else '-'}  "
                         f"{_duration(now - state['started'])}  "
                         f"ETA {_duration(left * own)}")
        return lines
