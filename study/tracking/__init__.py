"""MLflow tracking from the driver only (`study.tracking.tracker`) and the study's tracking server
(`study.tracking.server`, ``python -m study.tracking serve``).

The tracker's names are imported on first use, so that the server's command line starts without
loading MLflow's client and Ray.
"""

import importlib

_LAZY = {"StudyTracker": "study.tracking.tracker", "MlflowTrialCallback": "study.tracking.tracker",
         "TrackingUnavailable": "study.tracking.tracker"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'study.tracking' has no attribute {name!r}")


__all__ = sorted(_LAZY)
