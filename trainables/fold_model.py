"""A trained fold model: what a finished fold leaves behind and what analysis loads.

The network (the selected epoch's weights), its survival head fitted on the fold's training
patients (the Breslow baseline, or the logistic-hazard cuts), and enough of the configuration to
rebuild both. Saved as ``fold<k>_model.pt`` in the trial's final checkpoint with
``torch.save`` of plain tensors, lists and numbers, and loaded with ``weights_only=True``: no
optimizer, no scheduler, no trainer. `predict` gives the DPI (comparable across folds and
cohorts, `trainables.heads`) and survival probabilities of any volumes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datasets.errors import StudyError
from trainables.backbones import Backbone, build_backbone
from trainables.heads import SurvivalHead, build_head

FORMAT = 1
ARCHITECTURE_KEYS = ("backbone", "width", "depth", "dropout")
HEAD_KEYS = ("head", "cox_memory", "intervals", "horizon_days", "cut_spacing")


def model_file(fold: int) -> str:
    return f"fold{fold}_model.pt"


@dataclass
class FoldModel:
    """One fold's network and fitted head.

    Attributes
    ----------
    fold
        Fold number.
    network
        The backbone with the selected epoch's weights (eval mode, on the CPU unless moved).
    head
        The survival head, fitted on the fold's training patients.
    spec
        in_channels, out_features and the `ARCHITECTURE_KEYS` / `HEAD_KEYS` values it was built with.
    """

    fold: int
    network: Backbone
    head: SurvivalHead
    spec: dict

    @classmethod
    def from_training(cls, fold: int, config, in_channels: int, weights: dict, head: SurvivalHead) -> FoldModel:
        spec = {"in_channels": in_channels, "out_features": head.out_features,
                **{k: getattr(config, k) for k in ARCHITECTURE_KEYS + HEAD_KEYS}}
        network = _network(spec)
        network.load_state_dict(weights)
        return cls(fold, network.eval(), head, spec)

    def save(self, path: Path) -> None:
        payload = {"format": FORMAT, "fold": self.fold, "spec": self.spec,
                   "weights": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
                   "head": self.head.state()}
        tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> FoldModel:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise StudyError(f"fold model {path} cannot be read ({type(exc).__name__}: {exc})") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise StudyError(f"{path} is not a fold model of format {FORMAT}")
        spec = payload["spec"]
        network = _network(spec)
        network.load_state_dict(payload["weights"])
        head = build_head(spec["head"], cox_memory=spec["cox_memory"], intervals=spec["intervals"],
                          horizon_days=spec["horizon_days"], cut_spacing=spec["cut_spacing"])
        head.load_state(payload["head"])
        return cls(int(payload["fold"]), network.eval(), head, spec)

    @torch.no_grad()
    def outputs(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """Network outputs float64 [n, out_features] of volumes [n, C, X, Y, Z] (any float dtype)."""
        self.network.eval()
        device = next(self.network.parameters()).device
        chunks = [self.network(torch.as_tensor(np.asarray(images[i:i + batch_size], dtype=np.float32), device=device))
                  .float().cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(chunks).double().numpy()

    def predict(self, images: np.ndarray, times) -> dict[str, np.ndarray]:
        """``risk`` (DPI) [n], ``surv_365`` [n] and ``curves`` [n, len(times)] of volumes [n, C, X, Y, Z]."""
        out = self.outputs(images)
        return {"risk": self.head.risk(out), "surv_365": self.head.surv_365(out),
                "curves": self.head.survival(out, np.asarray(times, dtype=float))}


def _network(spec: dict) -> Backbone:
    return build_backbone(spec["backbone"], spec["in_channels"], spec["out_features"], spec["width"], spec["depth"],
                          spec["dropout"])
