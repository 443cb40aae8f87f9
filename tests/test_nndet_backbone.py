"""Tests for meddet.networks.nndet_backbone: nnDetection's native conv encoder and its Retina U-Net."""

import pytest
import torch
from torch import nn

from meddet.networks import NNDET_BACKBONE, NNDetEncoder, RetinaUNet, retina_unet_nndet

TINY = {"features_per_stage": (8, 16, 32, 32), "strides": (1, 2, 2, 2)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def expected_parameters(in_channels, features, convs=2, kernel_volume=27) -> int:
    """Bias-free convs plus affine InstanceNorm (weight + bias) per block."""
    total, previous = 0, in_channels
    for width in features:
        total += previous * width * kernel_volume + 2 * width
        total += (convs - 1) * (width * width * kernel_volume + 2 * width)
        previous = width
    return total


def test_default_encoder_matches_the_release_layout():
    encoder = NNDetEncoder()
    assert encoder.output_channels == [32, 64, 128, 256, 320, 320]
    assert encoder.strides == [1, 2, 2, 2, 2, 2]
    assert sum(p.numel() for p in encoder.parameters()) == expected_parameters(1, NNDET_BACKBONE["features_per_stage"])
    for stage, (width, stride) in enumerate(zip(encoder.output_channels, encoder.strides)):
        blocks = encoder.stages[stage]
        assert len(blocks) == 2
        for index, block in enumerate(blocks):
            assert [name for name, _ in block.named_children()] == ["conv", "norm", "act"]
            assert block.conv.kernel_size == (3, 3, 3) and block.conv.padding == (1, 1, 1)
            assert block.conv.bias is None
            assert block.conv.stride == ((stride,) * 3 if index == 0 else (1, 1, 1))
            assert block.conv.out_channels == width
            assert isinstance(block.norm, nn.InstanceNorm3d) and block.norm.affine and block.norm.eps == 1e-5
            assert type(block.act) is nn.ReLU


def test_forward_gives_one_map_per_stage_finest_first():
    encoder = NNDetEncoder(in_channels=2, **TINY)
    features = encoder(torch.randn(2, 2, 16, 16, 16))
    assert [tuple(f.shape) for f in features] == [
        (2, 8, 16, 16, 16), (2, 16, 8, 8, 8), (2, 32, 4, 4, 4), (2, 32, 2, 2, 2)
    ]


def test_per_stage_options_anisotropic_kernels_convs_and_leaky_relu():
    encoder = NNDetEncoder(
        features_per_stage=(4, 8, 8), strides=(1, (1, 2, 2), 2), kernel_sizes=[(1, 3, 3), 3, (3, 3, 1)],
        convs_per_stage=[1, 2, 3], activation="leaky_relu",
    )
    assert [len(stage) for stage in encoder.stages] == [1, 2, 3]
    first = encoder.stages[0][0]
    assert first.conv.kernel_size == (1, 3, 3) and first.conv.padding == (0, 1, 1)
    assert encoder.stages[2][2].conv.kernel_size == (3, 3, 1) and encoder.stages[2][2].conv.padding == (1, 1, 0)
    assert isinstance(first.act, nn.LeakyReLU) and first.act.negative_slope == pytest.approx(0.01)
    features = encoder(torch.randn(1, 1, 8, 8, 8))
    assert [tuple(f.shape[2:]) for f in features] == [(8, 8, 8), (8, 4, 4), (4, 2, 2)]
    assert encoder.strides == [1, [1, 2, 2], 2]

    one_triple = NNDetEncoder(features_per_stage=(4, 8), strides=(1, 2), kernel_sizes=(1, 3, 3))
    assert all(block.conv.kernel_size == (1, 3, 3) for stage in one_triple.stages for block in stage)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strides": (1, 2, 2)}, "strides has 3 entries"),
        ({"kernel_sizes": [3, 3]}, "kernel_sizes has 2 entries"),
        ({"convs_per_stage": 0}, "convs_per_stage"),
        ({"activation": "gelu"}, "activation"),
        ({"features_per_stage": ()}, "features_per_stage is empty"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NNDetEncoder(**{**TINY, **kwargs})


def test_retina_unet_runs_unchanged_on_the_native_encoder():
    network = retina_unet_nndet(
        in_channels=1, num_classes=2, num_anchors=3, fpn_channels=16, detection_levels=(2, 3), **TINY
    )
    assert isinstance(network, RetinaUNet) and isinstance(network.encoder, NNDetEncoder)
    assert network.level_strides == (1, 2, 4, 8) and network.detection_strides == (4, 8)
    output = network(torch.randn(2, 1, 16, 16, 16))
    assert [tuple(c.shape) for c in output["classification"]] == [(2, 6, 4, 4, 4), (2, 6, 2, 2, 2)]
    assert [tuple(r.shape) for r in output["box_regression"]] == [(2, 18, 4, 4, 4), (2, 18, 2, 2, 2)]
    assert tuple(output["segmentation"].shape) == (2, 2, 16, 16, 16)
    loss = sum(o.sum() for o in output["classification"]) + output["segmentation"].sum()
    loss.backward()
    assert network.encoder.stages[0][0].conv.weight.grad is not None


def test_default_factory_is_the_release_architecture():
    network = retina_unet_nndet()
    assert network.encoder.output_channels == [32, 64, 128, 256, 320, 320]
    assert network.level_strides == (1, 2, 4, 8, 16, 32)
    assert network.detection_strides == (4, 8, 16, 32) and network.total_stride == 32
    assert network.fpn_out_channels == [32, 64, 128, 128, 128, 128]
    assert network.classification_head.num_anchors == 27
