"""Shape tables of every backbone and scaled variant on tiny inputs; CBAM attention."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from datasets.errors import InputError
from trainables.backbones import BACKBONES, CBAM, ChannelAttention, SpatialAttention, build_backbone

VARIANTS = [pytest.param(1.0, 1.0, marks=pytest.mark.slow, id="full-width"), (0.5, 0.5), (0.25, 0.34)]


def test_every_built_in_space_names_registered_networks_heads_and_parameters():
    """Spaces name backbones, heads and training parameters without importing torch; the study
    checks them against the trainables' registries, and the built-in spaces pass that check."""
    from search_spaces import BUILTIN_SPACES, REFERENCE_BACKBONES, SPACES, SearchSpaceError
    from study.config import check_space

    assert set(REFERENCE_BACKBONES) <= set(BACKBONES)
    for name in BUILTIN_SPACES:
        check_space(SPACES[name], name)
    space = SPACES["smoke"]
    with pytest.raises(SearchSpaceError, match="unknown backbones \\['vit'\\]"):
        check_space(replace(space, backbones=("vit",)), "x.yaml")
    demo = replace(space.protocols["demo"], os_head="binary")  # a 1-year head cannot model overall survival
    with pytest.raises(SearchSpaceError, match="x.yaml: protocols.demo.os_head must be one of"):
        check_space(replace(space, protocols={**space.protocols, "demo": demo}), "x.yaml")


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("width, depth", VARIANTS)
@pytest.mark.parametrize("in_channels, shape, out_features", [
    (4, (32, 32, 24), 1),
    (1, (33, 40, 24), 20),
])
def test_output_shapes(name, width, depth, in_channels, shape, out_features):
    torch.manual_seed(0)
    net = build_backbone(name, in_channels, out_features, width, depth).eval()
    with torch.no_grad():
        out = net(torch.randn(2, in_channels, *shape))
    assert out.shape == (2, out_features)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_scaled_variant_trains_a_step_on_small_input(name):
    net = build_backbone(name, 4, 1, width=0.25, depth=0.34, dropout=0.2)
    out = net(torch.randn(3, 4, 32, 32, 24))
    out.sum().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    layer = dict(net.named_modules())[net.gradcam_layer]
    assert layer is not None


def test_width_and_depth_scale_the_network():
    full = sum(p.numel() for p in build_backbone("seresnext50", 4, 1).parameters())
    small = sum(p.numel() for p in build_backbone("seresnext50", 4, 1, 0.25, 0.34).parameters())
    assert 20e6 < full < 35e6  # SE-ResNeXt50 has ~26-28 M parameters
    assert small < full / 20


def test_resnet_cbam_has_cbam_in_every_bottleneck_and_a_strided_stem():
    net = build_backbone("resnet50_cbam", 4, 1)
    blocks = [m for m in net.modules() if m.__class__.__name__ == "CBAMBottleneck"]
    assert len(blocks) == 3 + 4 + 6 + 3
    assert all(isinstance(b.cbam, CBAM) for b in blocks)
    assert net.net.conv1.stride == (2, 2, 2)


def test_cbam_attention_maps():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 6, 5, 4) * 5
    channel, spatial = ChannelAttention(32, reduction=16), SpatialAttention(7)
    ca = channel.attention(x)
    sa = spatial.attention(x)
    assert ca.shape == (2, 32, 1, 1, 1) and sa.shape == (2, 1, 6, 5, 4)
    for a in (ca, sa):
        assert (a >= 0).all() and (a <= 1).all()
    assert CBAM(32)(x).shape == x.shape
    assert channel.mlp[0].out_channels == 2  # reduction 16


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "vgg16"}, r"unknown backbone 'vgg16'; valid backbones are \['densenet121', 'resnet50_cbam', 'seresnext50'\]"),
    ({"name": "seresnext50", "width": 0}, "width and depth must be in"),
    ({"name": "seresnext50", "dropout": 1.5}, "dropout must be in"),
])
def test_bad_backbone_arguments(kwargs, message):
    with pytest.raises(InputError, match=message):
        build_backbone(in_channels=4, out_features=1, **kwargs)
