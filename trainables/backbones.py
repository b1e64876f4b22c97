"""3D backbones of the reference study, built from MONAI's networks, with depth/width scaling.

==================  ==============================================  =============================
name                network                                          Grad-CAM layer
==================  ==============================================  =============================
``seresnext50``     MONAI `SENet` with `SEResNeXtBottleneck`,        ``layer4``
                    layers (3, 4, 6, 3), 32 groups, SE reduction 16
``resnet50_cbam``   MONAI `ResNet` with a bottleneck that applies    ``layer4``
                    CBAM (channel then spatial attention) before
                    the residual sum; stem stride 2 in every axis
``densenet121``     MONAI `DenseNet121` blocks (6, 12, 24, 16),      ``features.denseblock4``
                    growth 32, 64 initial features
==================  ==============================================  =============================

``width`` multiplies every channel count and ``depth`` every block count (at least one block per
stage), so a CPU-sized variant is the same family with parameters, e.g. ``width=0.25,
depth=0.34``. Inputs smaller than a network's total stride are zero-padded at its entry (the
background of a normalised volume is 0), so every variant accepts 32 x 32 x 24 and up.

Note: MONAI's `resnet50` defaults to ``conv1_t_stride=1`` (about 8x the FLOPs); the reference
ResNet50-CBAM, like here, strides its stem by 2 in every axis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet, ResNet, SENet
from monai.networks.nets.resnet import ResNetBottleneck
from monai.networks.nets.senet import SEResNeXtBottleneck
from torch import nn

from datasets.errors import InputError


class ChannelAttention(nn.Module):
    """CBAM channel attention: a shared MLP on average- and max-pooled features, sigmoid-gated."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv3d(channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv3d(hidden, channels, 1, bias=False))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, 1, 1, 1] weights in [0, 1]."""
        avg = self.mlp(F.adaptive_avg_pool3d(x, 1))
        mx = self.mlp(F.adaptive_max_pool3d(x, 1))
        return torch.sigmoid(avg + mx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a 7x7x7 convolution over the channel-wise mean and max."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv3d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, D, H, W] weights in [0, 1]."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CBAM(nn.Module):
    """Convolutional block attention module (Woo et al., ECCV 2018), 3D."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class CBAMBottleneck(ResNetBottleneck):
    """MONAI's ResNet bottleneck with CBAM on the residual branch before the sum."""

    def __init__(self, in_planes: int, planes: int, spatial_dims: int = 3, stride: int = 1,
                 downsample: nn.Module | None = None, act="relu", norm="batch"):
        super().__init__(in_planes, planes, spatial_dims, stride, downsample, norm=norm)
        self.cbam = CBAM(planes * self.expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.cbam(self.bn3(self.conv3(out)))
        return self.act(out + residual)


class _ScaledSENet(SENet):
    """MONAI's SENet with every stage's planes multiplied by `width` (MONAI fixes 64..512)."""

    def __init__(self, width: float, **kwargs):
        self._width = width
        super().__init__(**kwargs)
        self.last_linear = nn.Linear(self.inplanes, kwargs["num_classes"])

    def _make_layer(self, block, planes, blocks, groups, reduction, stride=1, downsample_kernel_size=1):
        return super()._make_layer(block, _channels(planes, self._width), blocks, groups, reduction, stride,
                                   downsample_kernel_size)


def _channels(base: int, width: float, multiple: int = 8) -> int:
    return max(multiple, int(round(base * width / multiple)) * multiple)


def _blocks(layers, depth: float) -> tuple[int, ...]:
    return tuple(max(1, int(round(n * depth))) for n in layers)


class PadToMinimum(nn.Module):
    """Zero-pads each spatial axis up to `minimum` voxels (symmetrically)."""

    def __init__(self, minimum: int):
        super().__init__()
        self.minimum = minimum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in reversed(x.shape[2:]):
            extra = max(0, self.minimum - size)
            pads += [extra // 2, extra - extra // 2]
        return F.pad(x, pads) if any(pads) else x


class Backbone(nn.Module):
    """A network mapping [B, C, X, Y, Z] volumes to [B, out_features] outputs."""

    def __init__(self, net: nn.Module, min_size: int, stages: tuple[str, ...]):
        super().__init__()
        self.pad = PadToMinimum(min_size)
        self.net = net
        # Stage outputs from shallow to deep: Grad-CAM uses the deepest one that keeps a spatial map.
        self.stages = tuple(f"net.{s}" for s in stages)
        self.gradcam_layer = self.stages[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.pad(x))


def _seresnext50(in_channels, out_features, width, depth, dropout) -> Backbone:
    groups = 32 if width >= 0.5 else 8
    net = _ScaledSENet(width, spatial_dims=3, in_channels=in_channels, block=SEResNeXtBottleneck,
                       layers=_blocks((3, 4, 6, 3), depth), groups=groups, reduction=16,
                       dropout_prob=dropout or None, inplanes=_channels(64, width), downsample_kernel_size=1,
                       input_3x3=False, num_classes=out_features)
    return Backbone(net, 1, ("layer1", "layer2", "layer3", "layer4"))


def _resnet50_cbam(in_channels, out_features, width, depth, dropout) -> Backbone:
    net = ResNet(block=CBAMBottleneck, layers=list(_blocks((3, 4, 6, 3), depth)),
                 block_inplanes=[_channels(c, width) for c in (64, 128, 256, 512)], spatial_dims=3,
                 n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, shortcut_type="B",
                 num_classes=out_features)
    if dropout:
        net.fc = nn.Sequential(nn.Dropout(dropout), net.fc)
    return Backbone(net, 1, ("layer1", "layer2", "layer3", "layer4"))


def _densenet121(in_channels, out_features, width, depth, dropout) -> Backbone:
    blocks = _blocks((6, 12, 24, 16), depth)
    net = DenseNet(spatial_dims=3, in_channels=in_channels, out_channels=out_features,
                   init_features=_channels(64, width), growth_rate=_channels(32, width, 4),
                   block_config=blocks, dropout_prob=dropout)
    # stem conv /2, max-pool /2, then an average pool /2 per transition: each needs >= 2 voxels.
    min_size = 2 ** (1 + len(blocks))
    return Backbone(net, min_size, tuple(f"features.denseblock{i + 1}" for i in range(len(blocks))))


@dataclass(frozen=True)
class BackboneSpec:
    builder: Callable[..., Backbone]
    description: str


BACKBONES: dict[str, BackboneSpec] = {
    "seresnext50": BackboneSpec(_seresnext50, "SE-ResNeXt50 (MONAI SENet, 32x4d, SE reduction 16)"),
    "resnet50_cbam": BackboneSpec(_resnet50_cbam, "ResNet50 with CBAM in every bottleneck, stride-2 stem"),
    "densenet121": BackboneSpec(_densenet121, "DenseNet-121 (MONAI DenseNet, growth 32)"),
}


def build_backbone(name: str, in_channels: int, out_features: int, width: float = 1.0, depth: float = 1.0,
                   dropout: float = 0.0) -> Backbone:
    """Build a backbone by name.

    Parameters
    ----------
    name
        One of `BACKBONES`.
    in_channels
        Number of MRI sequences.
    out_features
        Outputs of the final linear layer (1 for Cox and binary heads, the number of intervals
        for the logistic-hazard head).
    width, depth
        Channel and block-count multipliers (1.0 = the published network).
    dropout
        Dropout probability before the final layer.
    """
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; valid backbones are {sorted(BACKBONES)}")
    if not 0 < width <= 4 or not 0 < depth <= 4:
        raise InputError(f"backbone width and depth must be in (0, 4], got width={width}, depth={depth}")
    if not 0 <= dropout < 1:
        raise InputError(f"dropout must be in [0, 1), got {dropout}")
    return BACKBONES[name].builder(in_channels, out_features, width, depth, dropout)
