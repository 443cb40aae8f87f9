"""Tests for meddet.networks: ResEnc encoder, U-Net FPN, heads and Retina U-Net."""

import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from meddet.networks import (
    RESENC_L,
    ClassificationHead,
    RegressionHead,
    RetinaUNet,
    UNetFPN,
    build_resenc_encoder,
    fpn_channels_per_level,
    group_count,
    retina_unet_resenc,
)

TINY = {
    "features_per_stage": (8, 16, 32, 32),
    "strides": (1, 2, 2, 2),
    "blocks_per_stage": (1, 1, 1, 1),
}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # .parameters() yields every tensor once


def tiny_net(**overrides) -> RetinaUNet:
    kwargs = dict(TINY, num_classes=2, num_anchors=3, fpn_channels=32, min_fpn_channels=8, detection_levels=(2, 3))
    kwargs.update(overrides)
    return retina_unet_resenc(**kwargs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_full_size_encoder_parameters_and_forward_shapes():
    encoder = build_resenc_encoder(**RESENC_L)
    assert abs(count_parameters(encoder) - 90.30e6) <= 0.01e6

    net = retina_unet_resenc()
    assert net.level_strides == (1, 2, 4, 8, 16, 32)
    assert net.detection_strides == (4, 8, 16, 32)
    assert net.fpn_out_channels == [32, 64, 128, 128, 128, 128]
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 64, 64, 64))
    assert [tuple(t.shape) for t in out["classification"]] == [
        (1, 27, 64 // s, 64 // s, 64 // s) for s in (4, 8, 16, 32)
    ]
    assert [tuple(t.shape) for t in out["box_regression"]] == [
        (1, 27 * 6, 64 // s, 64 // s, 64 // s) for s in (4, 8, 16, 32)
    ]
    assert "segmentation" not in out  # eval mode skips the branch nothing at inference reads
    net.segmentation_at_inference = True
    with torch.no_grad():
        assert tuple(net(torch.randn(1, 1, 64, 64, 64))["segmentation"].shape) == (1, 2, 64, 64, 64)


def test_inference_without_segmentation_gives_the_same_detection_maps_and_skips_the_fine_pyramid():
    net = tiny_net().eval()
    calls = []
    for level, lateral in enumerate(net.fpn.lateral):
        lateral.register_forward_hook(lambda module, args, output, level=level: calls.append(level))
    x = torch.randn(2, 1, 16, 24, 32)
    with torch.no_grad():
        plain = net(x)
        skipped_levels = [level for level in range(4) if level not in calls]
        calls.clear()
        net.segmentation_at_inference = True
        full = net(x)
    assert skipped_levels == [0, 1] and sorted(calls) == [0, 1, 2, 3]
    assert "segmentation" not in plain and tuple(full["segmentation"].shape) == (2, 2, 16, 24, 32)
    for key in ("classification", "box_regression"):
        for got, want in zip(plain[key], full[key]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="subset of output_levels"):
        net.fpn(net.encoder(x), levels=(1,))


def test_tiny_network_shapes_strides_and_fpn_channels():
    net = tiny_net()
    assert net.detection_strides == (4, 8)
    assert net.total_stride == 8
    # halving below the first detection level: 32 -> 16 (P1) -> 8 (P0)
    assert net.fpn_out_channels == [8, 16, 32, 32]

    x = torch.randn(2, 1, 16, 24, 32)
    with torch.no_grad():
        pyramid = net.fpn(net.encoder(x))
        out = net(x)
    # P1 only passes features down: neither heads nor segmentation read it, so it has no output conv
    assert pyramid[1] is None
    for level in (0, 2, 3):
        channels, stride = net.fpn_out_channels[level], net.level_strides[level]
        assert tuple(pyramid[level].shape) == (2, channels, 16 // stride, 24 // stride, 32 // stride), level
    assert [tuple(t.shape) for t in out["classification"]] == [(2, 3 * 2, 4, 6, 8), (2, 3 * 2, 2, 3, 4)]
    assert [tuple(t.shape) for t in out["box_regression"]] == [(2, 3 * 6, 4, 6, 8), (2, 3 * 6, 2, 3, 4)]
    assert tuple(out["segmentation"].shape) == (2, 2, 16, 24, 32)


def test_fpn_channels_clamp_at_minimum():
    assert fpn_channels_per_level(6, 2, 128, 8) == [32, 64, 128, 128, 128, 128]
    assert fpn_channels_per_level(5, 3, 32, 8) == [8, 8, 16, 32, 32]
    net = tiny_net(fpn_channels=16, min_fpn_channels=8)
    assert net.fpn_out_channels == [8, 8, 16, 16]
    assert [lateral.out_channels for lateral in net.fpn.lateral] == [8, 8, 16, 16]
    assert [up.out_channels for up in net.fpn.up] == [8, 8, 16]
    assert {level: conv.out_channels for level, conv in net.fpn.output.items()} == {"0": 8, "2": 16, "3": 16}
    assert net.segmentation_head.logits.in_channels == 8


def test_fpn_handles_levels_that_share_a_resolution():
    fpn = UNetFPN(in_channels=(4, 6, 8), out_channels=(5, 7, 9), strides=(1, 1, 2))
    assert fpn.up[0].kernel_size == (1, 1, 1) and fpn.up[1].kernel_size == (2, 2, 2)
    features = [torch.randn(1, 4, 8, 8, 8), torch.randn(1, 6, 8, 8, 8), torch.randn(1, 8, 4, 4, 4)]
    shapes = [tuple(t.shape) for t in fpn(features)]
    assert shapes == [(1, 5, 8, 8, 8), (1, 7, 8, 8, 8), (1, 9, 4, 4, 4)]


def test_fpn_output_levels_select_returned_maps():
    fpn = UNetFPN(in_channels=(2, 3, 4), out_channels=(4, 4, 4), strides=(1, 2, 4), output_levels=(0, 2))
    out = fpn([torch.randn(1, 2, 8, 8, 8), torch.randn(1, 3, 4, 4, 4), torch.randn(1, 4, 2, 2, 2)])
    assert out[1] is None
    assert tuple(out[0].shape) == (1, 4, 8, 8, 8) and tuple(out[2].shape) == (1, 4, 2, 2, 2)
    with pytest.raises(ValueError, match="output_levels"):
        UNetFPN(in_channels=(2, 3), out_channels=(4, 4), strides=(1, 2), output_levels=(2,))


def test_fpn_top_down_path_reaches_finest_level():
    fpn = UNetFPN(in_channels=(2, 3), out_channels=(4, 4), strides=(1, 2))
    fine, coarse = torch.randn(1, 2, 4, 4, 4), torch.randn(1, 3, 2, 2, 2)
    with torch.no_grad():
        base = fpn([fine, coarse])[0]
        changed = fpn([fine, coarse + 1.0])[0]
    assert not torch.allclose(base, changed)


def test_encoder_keys_match_dynamic_network_architectures_unet():
    net = tiny_net()
    reference = ResidualEncoderUNet(
        input_channels=1,
        n_stages=4,
        features_per_stage=TINY["features_per_stage"],
        conv_op=nn.Conv3d,
        kernel_sizes=3,
        strides=TINY["strides"],
        n_blocks_per_stage=TINY["blocks_per_stage"],
        num_classes=2,
        n_conv_per_stage_decoder=1,
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )
    ours = {k: v.shape for k, v in net.state_dict().items() if k.startswith("encoder.")}
    theirs = {k: v.shape for k, v in reference.state_dict().items() if k.startswith("encoder.")}
    assert "encoder.stem.convs.0.conv.weight" in ours
    assert any(k.startswith("encoder.stages.0.") for k in ours)
    assert ours == theirs
    # the transfer path: strip the prefixes and strict-load stem and stages
    state = reference.state_dict()
    stem = {k[len("encoder.stem."):]: v for k, v in state.items() if k.startswith("encoder.stem.")}
    stages = {k[len("encoder.stages."):]: v for k, v in state.items() if k.startswith("encoder.stages.")}
    net.encoder.stem.load_state_dict(stem, strict=True)
    net.encoder.stages.load_state_dict(stages, strict=True)
    assert torch.equal(net.encoder.stem.convs[0].conv.weight, reference.encoder.stem.convs[0].conv.weight)


def test_regression_scale_is_learnable_and_scales_its_level_only():
    net = tiny_net().eval()
    scales = list(net.regression_head.scales)
    assert len(scales) == 2
    assert all(isinstance(s, nn.Parameter) and s.requires_grad for s in scales)
    assert any(s is p for s in scales for p in net.parameters())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        before = net(x)
        scales[0].fill_(2.5)
        after = net(x)
    assert torch.allclose(after["box_regression"][0], 2.5 * before["box_regression"][0], atol=1e-6)
    assert not torch.allclose(after["box_regression"][0], before["box_regression"][0])
    assert torch.equal(after["box_regression"][1], before["box_regression"][1])
    assert torch.equal(after["classification"][0], before["classification"][0])


def test_gradients_reach_every_parameter():
    net = tiny_net()
    out = net(torch.randn(1, 1, 16, 16, 16))
    total = out["segmentation"].sum()
    for maps in (out["classification"], out["box_regression"]):
        total = total + sum(m.sum() for m in maps)
    total.backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert missing == []
    assert all(s.grad is not None and s.grad.abs() > 0 for s in net.regression_head.scales)


def test_head_init_and_group_norm():
    head = ClassificationHead(in_channels=32, num_anchors=3, num_classes=2, num_convs=2)
    assert torch.allclose(torch.sigmoid(head.logits.bias), torch.full((6,), 0.01))
    norms = [m for m in head.tower if isinstance(m, nn.GroupNorm)]
    convs = [m for m in head.tower if isinstance(m, nn.Conv3d)]
    assert len(norms) == 2 and len(convs) == 2
    assert all(n.num_groups == 2 and n.affine for n in norms)
    assert abs(float(convs[0].weight.detach().std()) - 0.01) < 0.002
    regression = RegressionHead(in_channels=24, num_anchors=3, num_levels=2, num_convs=1)
    assert [m.num_groups for m in regression.tower if isinstance(m, nn.GroupNorm)] == [1]
    for channels in (8, 16, 48, 56, 128, 320):
        groups = group_count(channels)
        assert channels % groups == 0 and 1 <= groups <= max(1, channels // 16)
    assert group_count(128) == 8


def test_non_divisible_input_raises():
    net = tiny_net()
    with pytest.raises(ValueError, match="not divisible by the network's total stride 8"):
        net(torch.randn(1, 1, 16, 20, 16))


def test_invalid_configurations_raise():
    with pytest.raises(ValueError, match="detection_levels"):
        tiny_net(detection_levels=(2, 3, 4, 5))
    with pytest.raises(ValueError, match="anisotropic"):
        tiny_net(strides=(1, 2, (2, 2, 1), 2))
    with pytest.raises(ValueError, match="full-resolution"):
        tiny_net(strides=(2, 2, 2, 2))
    with pytest.raises(ValueError, match="blocks_per_stage"):
        build_resenc_encoder(features_per_stage=(8, 16), strides=(1, 2), blocks_per_stage=(1,))
    with pytest.raises(TypeError, match="output_channels"):
        RetinaUNet(nn.Conv3d(1, 8, 3))


def test_too_small_input_names_the_minimum():
    net = tiny_net()  # total stride 8: 8^3 leaves one voxel in the deepest stage
    with pytest.raises(ValueError, match=r"too small.*at least one axis of 16, e.g. \(16, 16, 16\)"):
        net(torch.randn(1, 1, 8, 8, 8))
    net(torch.randn(1, 1, 16, 8, 8))  # one axis of 16 is enough


def test_full_size_network_refuses_32_cubed_with_the_minimum():
    net = retina_unet_resenc()
    with pytest.raises(ValueError, match=r"stride 32.*\(64, 64, 64\)"):
        net(torch.zeros(1, 1, 32, 32, 32))
