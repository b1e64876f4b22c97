"""Grad-CAM orientation and shapes: for a model trained to see tumours, the map peaks in them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.gradcam import cam_layer, gradcam_map, overlay
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


def test_overlay_cuts_through_the_tumour(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 32, 32, 24)).astype(np.float32)
    mask = np.ones((32, 32, 24), dtype=np.uint8)
    label = np.zeros_like(mask)
    label[20:24, 8:12, 5:9] = 1
    centre = overlay(image, ["t1", "t1c", "t2", "flair"], rng.random((32, 32, 24)), mask, label, "test", tmp_path / "o.png")
    assert label[centre] == 1
    assert (tmp_path / "o.png").stat().st_size > 5000


@pytest.mark.slow
def test_map_peaks_in_the_tumour_for_a_model_trained_to_see_it(learnable_store):
    """Label: tumour larger than the cohort median, visible only in the images."""
    from scipy import ndimage

    from datasets import Cohort
    from trainables import FoldData, FoldTrainer, TrainConfig

    cohort = Cohort(learnable_store)
    store = cohort.store
    volumes = store.images(cohort.slots)
    tumour = np.array([store.label(int(s)).sum() for s in cohort.slots], dtype=float)
    label = (tumour > np.median(tumour)).astype(float)
    order = np.random.default_rng(0).permutation(len(cohort))
    train, val = np.sort(order[:110]), np.sort(order[110:])
    data = FoldData(store, cohort.patient_ids, cohort.slots, cohort.time, cohort.event, label, train, val, 0, volumes)
    trainer = FoldTrainer(data, TrainConfig(backbone="resnet50_cbam", width=0.25, depth=0.2, head="binary", lr=2e-3,
                                            batch_size=16, epochs=14, warmup_epochs=1, augmentation=0.3,
                                            weight_decay=1e-4))
    while not trainer.finished:
        trainer.step()
    accuracy = ((trainer.predict(val)[:, 0] > 0) == (label[val] == 1)).mean()
    assert accuracy > 0.75, f"the model must see tumours first (validation accuracy {accuracy:.2f})"
    hits = []
    for position in val[label[val] == 1][:12]:
        slot = int(cohort.slots[position])
        cam = gradcam_map(trainer.model, volumes[position].astype(np.float32))
        peak = np.unravel_index(np.argmax(np.where(store.mask(slot) > 0, cam, -1)), cam.shape)
        hits.append(bool(ndimage.binary_dilation(store.label(slot) > 0, iterations=2)[peak]))
    assert np.mean(hits) >= 0.6, hits
