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


def _recipe_blocks(section: str) -> dict[str, str]:
    """CONTRIBUTING.md's code blocks of one section, by the file their first line names."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "CONTRIBUTING.md").read_text()
    part = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = {}
    for block in re.findall(r"```python\n(.*?)```", part, flags=re.S):
        lines = [line[3:] if line.startswith("   ") else line for line in block.splitlines()]  # list indentation
        blocks[lines[0].lstrip("# ").strip()] = "\n".join(lines[1:]) + "\n"
    return blocks


@pytest.mark.slow
def test_a_metric_added_as_contributing_says_reaches_mlflow_results_the_report_and_external_validation(
        learnable_store, tmp_path):
    """CONTRIBUTING.md's two code blocks, appended to a copy of the project's two files as written there:
    a study and its report then carry the metric in each trial's MLflow run, in results.md, in the
    report's leaderboard and in its external validation, with the value recomputed from the
    predictions the study wrote."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd
    from mlflow.tracking import MlflowClient
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    from evaluation import metric_names as names

    blocks = _recipe_blocks("A new metric")
    assert set(blocks) == {"evaluation/metric_names.py", "evaluation/prediction_metrics.py"}
    root = Path(__file__).parents[1]
    copy = tmp_path / "project"
    for package in ("analysis", "datasets", "evaluation", "search_spaces", "study", "trainables"):
        shutil.copytree(root / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    for file, code in blocks.items():
        with open(copy / file, "a") as out:
            out.write("\n\n" + code)
    env = {**os.environ, "PYTHONPATH": str(copy)}
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def run(*args):
        done = subprocess.run([sys.executable, "-m", *args], cwd=copy, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run("study.run", "--space", "smoke", "--data", str(learnable_store), "--tasks", "os_all", "--backbones",
        "densenet121", "--inputs", "image", "--num-samples", "1", "--tracking-uri", uri, "--storage-path",
        str(tmp_path / "runs"), "--name", "recipe")
    run("analysis.report", "--study", "recipe", "--tracking-uri", uri, "--external", str(learnable_store),
        "--out", str(tmp_path / "report"), "--gradcam-random", "0")

    def auc_730(time, event, risk) -> float:  # scikit-survival's, on the predictions the study wrote
        survival = Surv.from_arrays(event.astype(bool), time)
        return float(cumulative_dynamic_auc(survival, survival, risk, [730.0])[0][0])

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("recipe").experiment_id
    (trial,) = client.search_runs([experiment], names.role_filter(names.TRIAL_ROLE))
    oof = pd.read_csv(client.download_artifacts(trial.info.run_id, names.OOF_FILE, str(tmp_path)))
    logged = trial.data.metrics["time_auc_730"]
    assert logged == pytest.approx(auc_730(oof["time"].to_numpy(), oof["event"].to_numpy(), oof["risk"].to_numpy()),
                                   abs=1e-6)
    results = (tmp_path / "runs" / "recipe" / "results.md").read_text()
    assert f"cumulative/dynamic IPCW AUC at day 730 | {logged:.3f}" in results
    board = pd.read_csv(tmp_path / "report" / "leaderboard.csv")
    assert board["AUC (730 d)"].tolist() == [round(logged, 3)]
    external = pd.read_csv(tmp_path / "report" / "external_validation.csv")
    (scored,) = (tmp_path / "report").glob(f"external_densenet121__os_all_{learnable_store.stem}.csv")
    pred = pd.read_csv(scored)
    expected = auc_730(pred["time"].to_numpy(), pred["event"].to_numpy(), pred["dpi"].to_numpy())
    assert external["AUC (730 d)"].tolist() == [pytest.approx(expected, abs=1e-3)]
