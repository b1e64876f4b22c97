"""A trained fold model: what a finished fold leaves behind and what analysis loads.

The network (the selected epoch's weights), its survival head fitted on the fold's training
patients (the Breslow baseline, or the logistic-hazard cuts), for an ``image+clinical`` network
the clinical encoding learned on those patients (`datasets.clinical_features`), and enough of
the configuration to rebuild them. Saved as ``fold<k>_model.pt`` in the trial's final checkpoint with
``torch.save`` of plain tensors, lists and numbers, and loaded with ``weights_only=True``: no
optimizer, no scheduler, no trainer. `predict` gives the DPI (comparable across folds and
cohorts, `trainables.heads`) and survival probabilities of any volumes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from datasets.clinical_features import ClinicalEncoder, IMAGE
from datasets.errors import StudyError
from trainables.backbones import Backbone
from trainables.fusion import build_network, image_branch
from trainables.heads import HEADS, SurvivalHead, build_head

FORMAT = 1
ARCHITECTURE_KEYS = ("backbone", "width", "depth", "dropout", "inputs", "clinical_hidden", "clinical_dropout")


def model_file(fold: int) -> str:
    return f"fold{fold}_model.pt"


def network_spec(config, in_channels: int, out_features: int, encoder: ClinicalEncoder | None) -> dict:
    """What `trainables.fusion.build_network` needs, from a `TrainConfig` (plain values: saved as is)."""
    return {"in_channels": in_channels, "out_features": out_features,
            "clinical_features": len(encoder) if encoder is not None else 0,
            **{k: getattr(config, k) for k in ARCHITECTURE_KEYS + head_keys(config.head)}}


def resume_keys(config) -> tuple[str, ...]:
    """What a checkpoint must agree on to be resumed: what the network is built from (the
    architecture and the head with its own options) and the clinical columns it is fed."""
    return (*ARCHITECTURE_KEYS, *head_keys(config.head), "clinical_inputs")


def head_keys(head: str) -> tuple[str, ...]:
    """The head's name and its own options (`trainables.heads`), looked up when a model is saved so
    that a head registered after import keeps its options too."""
    return ("head", *HEADS[head].options)


@dataclass
class FoldModel:
    """One fold's network and fitted head.

    Attributes
    ----------
    fold
        Fold number.
    network
        The network with the selected epoch's weights (eval mode, on the CPU unless moved): a
        backbone, or a `trainables.fusion.FusionNetwork` for ``image+clinical`` inputs.
    head
        The survival head, fitted on the fold's training patients.
    spec
        in_channels, out_features, clinical_features and the `ARCHITECTURE_KEYS` / `head_keys`
        values it was built with.
    encoder
        The clinical encoding of an ``image+clinical`` network (None for an image-only one).
    """

    fold: int
    network: nn.Module
    head: SurvivalHead
    spec: dict
    encoder: ClinicalEncoder | None = None

    @classmethod
    def from_training(cls, fold: int, config, in_channels: int, weights: dict, head: SurvivalHead,
                      encoder: ClinicalEncoder | None = None) -> FoldModel:
        spec = network_spec(config, in_channels, head.out_features, encoder)
        network = build_network(spec)
        network.load_state_dict(weights)
        return cls(fold, network.eval(), head, spec, encoder)

    @property
    def inputs(self) -> str:
        return self.spec.get("inputs", IMAGE)

    @property
    def image_network(self) -> Backbone:
        """The backbone (Grad-CAM's network; for a fusion model its image branch, `trainables.fusion`)."""
        return image_branch(self.network)

    def save(self, path: Path) -> None:
        payload = {"format": FORMAT, "fold": self.fold, "spec": self.spec,
                   "weights": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
                   "head": self.head.state(), "clinical": None if self.encoder is None else self.encoder.state()}
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
        network = build_network(spec)
        network.load_state_dict(payload["weights"])
        head = build_head(spec["head"], **spec)
        head.load_state(payload["head"])
        encoder = ClinicalEncoder.from_state(payload["clinical"]) if payload.get("clinical") else None
        return cls(int(payload["fold"]), network.eval(), head, spec, encoder)

    @torch.no_grad()
    def outputs(self, images: np.ndarray, clinical: pd.DataFrame | None = None, batch_size: int = 16) -> np.ndarray:
        """Network outputs float64 [n, out_features] of volumes [n, C, X, Y, Z] (any float dtype) and, for
        an ``image+clinical`` model, the same patients' clinical rows (encoded as in training)."""
        self.network.eval()
        device = next(self.network.parameters()).device
        features = None
        if self.encoder is not None:
            if clinical is None or len(clinical) != len(images):
                raise StudyError(f"fold model {self.fold} takes images and clinical inputs "
                                 f"({', '.join(self.encoder.columns)}): pass one clinical row per volume")
            features = torch.as_tensor(self.encoder.encode(clinical), device=device)
        chunks = []
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(np.asarray(images[i:i + batch_size], dtype=np.float32), device=device)
            out = self.network(x) if features is None else self.network(x, features[i:i + batch_size])
            chunks.append(out.float().cpu())
        return torch.cat(chunks).double().numpy()

    def predict(self, images: np.ndarray, times, clinical: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
        """``risk`` (DPI) [n], ``surv_365`` [n] and ``curves`` [n, len(times)] of volumes [n, C, X, Y, Z]
        (and their clinical rows for an ``image+clinical`` model)."""
        out = self.outputs(images, clinical)
        return {"risk": self.head.risk(out), "surv_365": self.head.surv_365(out),
                "curves": self.head.survival(out, np.asarray(times, dtype=float))}

