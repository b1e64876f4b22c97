"""A new backbone or head is one registry entry: registered at run time here (as a newcomer's
module would at import), it is accepted by the study's flags and space checks, the training
configuration and the builders, with no other file touched (CONTRIBUTING.md walks through it)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from study.config import check_space, fixed_parameters, resolve
from study.run import build_parser
from trainables.backbones import BACKBONES, Backbone, BackboneSpec, build_backbone
from trainables.config import TrainConfig
from trainables.heads import HEADS, CoxHead, build_head


def _tiny_net(in_channels, out_features, width, depth, dropout) -> Backbone:
    net = nn.Sequential()
    net.add_module("features", nn.Conv3d(in_channels, 4, 3, padding=1))
    net.add_module("pool", nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, out_features)))
    return Backbone(net, 1, ("features",))


class ScaledCoxHead(CoxHead):
    """A head with no options of its own: the Cox loss on outputs divided by 2."""

    name = "scaled_cox"
    options = ()

    @classmethod
    def from_options(cls) -> ScaledCoxHead:
        return cls()

    def loss(self, outputs, time, event):
        return super().loss(outputs / 2, time, event)


def test_a_backbone_registered_once_is_studied_configured_and_built(monkeypatch):
    monkeypatch.setitem(BACKBONES, "tiny", BackboneSpec(_tiny_net, "a 3D convolution and a linear read-out"))
    config = resolve(build_parser().parse_args(["--backbones", "tiny", "--tasks", "os_all"]))
    (cell,) = config.cells()
    fixed = fixed_parameters(config, cell)
    assert fixed["backbone"] == "tiny"
    check_space(replace(config.search_space, backbones=("tiny",)), "x.yaml")  # a space may name it too
    TrainConfig.from_dict({**fixed, **config.search_space.reference_for(config.budget, cell.inputs)})
    out = build_backbone("tiny", 4, 1)(torch.zeros(2, 4, 8, 8, 8))
    assert out.shape == (2, 1)


def test_a_head_registered_once_is_checked_configured_and_built(monkeypatch):
    monkeypatch.setitem(HEADS, ScaledCoxHead.name, ScaledCoxHead)
    config = resolve(build_parser().parse_args(["--space", "smoke", "--tasks", "os_all"]))
    space = config.search_space
    demo = replace(space.protocols["demo"], os_head="scaled_cox")
    check_space(replace(space, protocols={**space.protocols, "demo": demo}), "x.yaml")  # an OS head: accepted
    head = build_head("scaled_cox", **TrainConfig(head="scaled_cox").to_dict())
    time, event = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 0.0])
    outputs = torch.tensor([[2.0], [0.0], [-2.0]])
    assert torch.isclose(head.loss(outputs, time, event), CoxHead().loss(outputs / 2, time, event))
    assert np.allclose(head.score(outputs.numpy()), [2.0, 0.0, -2.0])
    with pytest.raises(Exception, match="unknown head 'vit_head'"):
        TrainConfig(head="vit_head")


class ClippedCoxHead(CoxHead):
    """A head with an option of its own. Its option is a TrainConfig field that no built-in head
    reads (`grad_clip`), standing in for the new field a real head would add."""

    name = "clipped_cox"
    options = ("grad_clip",)

    def __init__(self, clip: float = 1.0):
        super().__init__()
        self.clip = clip

    @classmethod
    def from_options(cls, grad_clip: float = 1.0) -> ClippedCoxHead:
        return cls(grad_clip)

    def loss(self, outputs, time, event):
        return super().loss(outputs.clamp(-self.clip, self.clip), time, event)


def test_a_registered_heads_options_are_saved_with_its_fold_model_and_reloaded(monkeypatch, tmp_path):
    from trainables.fold_model import FoldModel, network_spec
    from trainables.fusion import build_network

    monkeypatch.setitem(HEADS, ClippedCoxHead.name, ClippedCoxHead)
    config = TrainConfig(head="clipped_cox", grad_clip=3.0, width=0.25, depth=0.34)
    head = build_head(config.head, **config.to_dict())
    head.fit(np.array([[0.1], [0.2], [0.3]]), np.array([100.0, 200.0, 400.0]), np.array([1, 1, 0]))
    network = build_network(network_spec(config, 4, head.out_features, None))
    FoldModel.from_training(0, config, 4, network.state_dict(), head).save(tmp_path / "fold0_model.pt")
    loaded = FoldModel.load(tmp_path / "fold0_model.pt")
    assert isinstance(loaded.head, ClippedCoxHead) and loaded.head.clip == 3.0  # not the default 1.0


def test_a_resumed_fold_checks_every_option_of_its_head(monkeypatch, small_store, tmp_path):
    """The checkpoint's architecture once listed two logistic-hazard options by hand: a fold resumed
    with another `horizon_days`, or another option of a head registered later, continued silently."""
    from tests.test_trainables_fold import TINY, _fold_data
    from trainables.fold import CheckpointError, FoldTrainer

    monkeypatch.setitem(HEADS, ClippedCoxHead.name, ClippedCoxHead)
    for head, option, first, second in [("clipped_cox", "grad_clip", 3.0, 2.0),
                                        ("logistic_hazard", "horizon_days", 1825.0, 1095.0)]:
        path = tmp_path / f"{head}.pt"
        FoldTrainer(_fold_data(small_store, k=2), TrainConfig(epochs=2, head=head, **{option: first}, **TINY),
                    path).step()
        FoldTrainer(_fold_data(small_store, k=2), TrainConfig(epochs=2, head=head, **{option: first}, **TINY), path)
        with pytest.raises(CheckpointError, match=rf"'{option}': {first}"):
            FoldTrainer(_fold_data(small_store, k=2), TrainConfig(epochs=2, head=head, **{option: second}, **TINY),
                        path)
