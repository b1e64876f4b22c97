"""Grad-CAM orientation and shapes: for a model trained to see tumours, the map peaks in them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.gradcam import attention_in_region, cam_layer, gradcam_map, overlay, untrained_twin
from trainables.backbones import build_backbone


def test_map_shape_and_layer_choice_on_small_inputs():
    torch.manual_seed(0)
    for name in ("seresnext50", "resnet50_cbam", "densenet121"):
        model = build_backbone(name, 4, 1, width=0.25, depth=0.2)
        image = np.random.default_rng(0).normal(size=(4, 32, 32, 24)).astype(np.float32)
        cam = gradcam_map(model, image)
        assert cam.shape == (32, 32, 24)
        assert cam.min() >= 0 and cam.max() <= 1
        layer = cam_layer(model, model.pad(torch.from_numpy(image)[None]))
        assert layer != model.stages[-1], "the 1x1x1 last stage is skipped on small inputs"


class _SpotDetector(torch.nn.Module):
    """Responds to bright voxels of channel 0: its risk is the maximum of a ReLU'd convolution."""

    def __init__(self):
        super().__init__()
        self.layer1 = torch.nn.Conv3d(4, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.layer1.weight.zero_()
            self.layer1.weight[:, 0, 1, 1, 1] = 1.0

    def forward(self, x):
        return torch.relu(self.layer1(x)).amax(dim=(2, 3, 4)).sum(dim=1, keepdim=True)


@pytest.mark.parametrize("shape, spot", [((32, 32, 24), (5, 20, 3)), ((24, 28, 20), (18, 4, 15))])
def test_map_is_on_the_image_grid_without_flips(shape, spot):
    """A network that sees one bright spot: the map must peak exactly there (no flip, no shift),
    also when the backbone pads small inputs (24 x 28 x 20 is padded to 32 per axis)."""
    from trainables.backbones import Backbone

    model = Backbone(_SpotDetector(), 32, ("layer1",))
    image = np.zeros((4, *shape), dtype=np.float32)
    image[0][spot] = 5.0
    cam = gradcam_map(model, image)
    assert cam.shape == shape
    assert np.unravel_index(np.argmax(cam), cam.shape) == spot


class _StridedSpotDetector(torch.nn.Module):
    """A stride-2 7x7x7 stem and a stride-2 max-pool (as the backbones' stems) that see channel 0."""

    def __init__(self):
        super().__init__()
        self.layer1 = torch.nn.Sequential(torch.nn.Conv3d(4, 2, 7, stride=2, padding=3, bias=False),
                                          torch.nn.MaxPool3d(3, stride=2, padding=1))
        with torch.no_grad():
            self.layer1[0].weight.zero_()
            self.layer1[0].weight[:, 0, 3, 3, 3] = 1.0

    def forward(self, x):
        return torch.relu(self.layer1(x)).amax(dim=(2, 3, 4)).sum(dim=1, keepdim=True)


def test_map_of_a_strided_stage_is_placed_on_its_receptive_fields():
    """Cell j of a /4 stage is centred on input voxel 4j: the map peaks on the spot the network
    sees, where a plain trilinear upsampling would put it 1.5 voxels further along every axis."""
    from analysis.gradcam import feature_grid
    from trainables.backbones import Backbone

    model = Backbone(_StridedSpotDetector(), 32, ("layer1",))
    stride, offset = feature_grid(model.net, torch.zeros(1, 4, 32, 32, 24), "layer1")
    np.testing.assert_allclose(stride, 4.0)
    np.testing.assert_allclose(offset, 0.0, atol=0.75)  # plain upsampling: +1.5
    image = np.zeros((4, 32, 32, 24), dtype=np.float32)
    image[0, 16, 12, 8] = 5.0
    cam = gradcam_map(model, image)
    peak = np.unravel_index(np.argmax(cam), cam.shape)
    assert np.abs(np.subtract(peak, (16, 12, 8))).max() <= 1, peak


def test_overlay_cuts_through_the_tumour(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 32, 32, 24)).astype(np.float32)
    mask = np.ones((32, 32, 24), dtype=np.uint8)
    label = np.zeros_like(mask)
    label[20:24, 8:12, 5:9] = 1
    cuts = dict(overlay(image, ["t1", "t1c", "t2", "flair"], rng.random((32, 32, 24)), mask, label, "test",
                        tmp_path / "o.png"))
    assert label[cuts["tumour centre"]] == 1 and "map maximum" in cuts
    assert (tmp_path / "o.png").stat().st_size > 5000


@pytest.mark.slow
@pytest.mark.benchmark  # trains a network for a minute: a known-answer check
def test_attention_of_a_model_trained_to_see_tumours_is_on_them(learnable_store):
    """Target: tumour larger than the cohort median, visible only in the images, as a 1-year death
    (large: death at day 100; small: alive at day 400), so the binary head learns tumour size. For
    the validation patients with large tumours, the map's mass on tumour + oedema is above that
    region's share of the head (the report's enrichment, 1 = uniform attention). Bright tumours
    draw the maps of untrained networks too (about as much here), which is why the report shows
    an untrained twin beside every score. Seeded, one thread; the assertion is on an effect size
    that held over seeds 0-2, not on exact values."""
    from datasets import Cohort
    from trainables.config import TrainConfig
    from trainables.fold import FoldData, FoldTrainer

    torch.set_num_threads(1)
    cohort = Cohort(learnable_store)
    store = cohort.store
    volumes = store.images(cohort.slots)
    tumour = np.array([store.label(int(s)).sum() for s in cohort.slots], dtype=float)
    large = tumour > np.median(tumour)
    time, event = np.where(large, 100.0, 400.0), large.astype(int)
    order = np.random.default_rng(0).permutation(len(cohort))
    train, val = np.sort(order[:110]), np.sort(order[110:])
    data = FoldData(store, cohort.patient_ids, cohort.slots, time, event, train, val, 0, volumes)
    trainer = FoldTrainer(data, TrainConfig(backbone="resnet50_cbam", width=0.25, depth=0.2, head="binary", lr=2e-3,
                                            batch_size=16, epochs=14, warmup_epochs=1, augmentation=1.0,
                                            weight_decay=1e-4, seed=0))
    while not trainer.finished:
        trainer.step()
    accuracy = ((trainer.predict(val)[:, 0] > 0) == large[val]).mean()
    assert accuracy > 0.75, f"the model must see tumours first (validation accuracy {accuracy:.2f})"
    scores = []
    for position in val[large[val]]:
        slot = int(cohort.slots[position])
        cam = gradcam_map(trainer.model, volumes[position].astype(np.float32))
        scores.append(attention_in_region(cam, store.mask(slot), store.label(slot))["enrichment"])
    assert np.median(scores) >= 1.2, np.round(scores, 2)


def test_untrained_twin_has_the_architecture_and_fresh_weights():
    model = build_backbone("densenet121", 4, 1, width=0.25, depth=0.2)
    twin = untrained_twin(model, seed=1)
    assert str(twin) == str(model) and twin is not model
    assert not torch.equal(next(twin.parameters()), next(model.parameters()))
    assert torch.equal(next(untrained_twin(model, seed=1).parameters()), next(twin.parameters()))  # seeded


def test_enrichment_is_one_for_uniform_attention_and_high_for_a_map_on_the_region():
    mask = np.ones((20, 20, 20), dtype=np.uint8)
    region = np.zeros_like(mask)
    region[5:10, 5:10, 5:10] = 1
    uniform = attention_in_region(np.ones((20, 20, 20)), mask, region)
    assert uniform["enrichment"] == pytest.approx(1.0) and uniform["region_share"] == pytest.approx(125 / 8000)
    assert uniform["enrichment_axial"] == pytest.approx(1.0)
    focused = attention_in_region(region.astype(float), mask, region)
    assert focused["enrichment"] == pytest.approx(8000 / 125) and focused["hit"] == 1.0
    elsewhere = np.zeros((20, 20, 20))
    elsewhere[15, 15, 15] = 1.0
    assert attention_in_region(elsewhere, mask, region)["hit"] == 0.0
    with pytest.raises(ValueError, match="region is empty"):
        attention_in_region(np.ones((20, 20, 20)), mask, np.zeros_like(mask))


def test_the_logistic_hazard_map_explains_the_dpi_the_report_ranks_by():
    """Grad-CAM's target for the logistic-hazard head is its DPI (minus the restricted mean survival
    time), not the mean of its hazard logits, which ranks patients differently."""
    from analysis.gradcam import _Risk
    from trainables.heads import build_head

    torch.manual_seed(0)
    head = build_head("logistic_hazard", intervals=19)
    model = build_backbone("resnet50_cbam", 4, head.out_features, width=0.25, depth=0.2).eval()
    x = model.pad(torch.randn(6, 4, 32, 32, 24))
    with torch.no_grad():
        outputs = model.net(x)
        explained = _Risk(model.net, head)(x)[:, 0].numpy()
    assert np.allclose(explained, head.score(outputs.numpy().astype(np.float64)), atol=1e-4)
    assert np.allclose(_Risk(model.net)(x)[:, 0].detach().numpy(), outputs.mean(1).numpy())  # the old target
    cam = gradcam_map(model, np.random.default_rng(1).normal(size=(4, 32, 32, 24)).astype(np.float32), head)
    assert cam.shape == (32, 32, 24) and 0 <= cam.min() <= cam.max() <= 1
