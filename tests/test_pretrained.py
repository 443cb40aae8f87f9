"""Tests for meddet.pretrained: released nnssl checkpoints into ResEnc encoders, and the native MultiTalent fusion."""

import logging

import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from meddet.networks import RESENC_L, retina_unet_nndet, retina_unet_resenc
from meddet.pretrained import (
    adapt_input_channels,
    available_stems,
    encoder_state_dict,
    initialize_from_pretrained,
    load_native_multitalent,
    load_pretrained_encoder,
    make_nnssl_checkpoint,
    read_checkpoint,
    select_stem,
)

TINY = {"features_per_stage": (8, 16, 32, 32), "strides": (1, 2, 2, 2), "blocks_per_stage": (1, 1, 1, 1)}
TINY_HEADS = {"num_classes": 1, "num_anchors": 3, "fpn_channels": 16, "min_fpn_channels": 8, "detection_levels": (2, 3)}
MAE_URL = "https://huggingface.co/MIC-DKFZ/ResEncL-MissingPiece-MAE/resolve/main/checkpoint_final.pth"


def pretraining_unet(features_per_stage, strides, blocks_per_stage, in_channels=1, seed=0) -> ResidualEncoderUNet:
    """A ResEnc U-Net as nnssl pre-trains it, with every tensor drawn at random (so no value equals an init)."""
    torch.manual_seed(seed)
    network = ResidualEncoderUNet(
        in_channels, len(features_per_stage), list(features_per_stage), nn.Conv3d, 3, list(strides),
        list(blocks_per_stage), 1, 1, conv_bias=True, norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
    )
    with torch.no_grad():
        for parameter in network.parameters():  # each tensor once, so aliased names stay one tensor
            parameter.normal_(0.0, 0.05)
    return network


def arch_kwargs(features_per_stage, strides, blocks_per_stage) -> dict:
    return {
        "n_stages": len(features_per_stage), "features_per_stage": list(features_per_stage),
        "kernel_sizes": [[3, 3, 3]] * len(features_per_stage), "strides": [[s] * 3 for s in strides],
        "n_blocks_per_stage": list(blocks_per_stage), "conv_bias": True,
    }


def write_checkpoint(network: ResidualEncoderUNet, path, config=TINY, **kwargs) -> str:
    return make_nnssl_checkpoint(network.state_dict(), str(path), arch_kwargs(**config), **kwargs)


def tiny_network(**overrides):
    return retina_unet_resenc(**{**TINY, **TINY_HEADS, **overrides})


def outside_encoder(network) -> dict:
    return {key: value.clone() for key, value in network.state_dict().items() if not key.startswith("encoder.")}


def assert_untouched(network, before: dict) -> None:
    after = network.state_dict()
    assert before, "nothing outside the encoder to compare"
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.fixture(scope="module")
def resenc_l(tmp_path_factory):
    """A full-size ResEnc-L pre-training U-Net written in the release format (built once: ~400 MB)."""
    network = pretraining_unet(RESENC_L["features_per_stage"], RESENC_L["strides"], RESENC_L["blocks_per_stage"])
    config = {key: RESENC_L[key] for key in ("features_per_stage", "strides", "blocks_per_stage")}
    path = write_checkpoint(network, tmp_path_factory.mktemp("mae") / "checkpoint_final.pth", config)
    return path, network.state_dict()


# ------------------------------------------------------------------------------------------- full size


def test_full_size_resenc_l_loads_encoder_and_stem_only(resenc_l, caplog):
    path, weights = resenc_l
    checkpoint = read_checkpoint(path)
    assert len(checkpoint["network_weights"]) == 956
    assert len({t.untyped_storage().data_ptr() for t in checkpoint["network_weights"].values()}) == 264
    torch.manual_seed(1)
    network = retina_unet_resenc()
    before = outside_encoder(network)
    with caplog.at_level(logging.INFO, logger="meddet.pretrained"):
        report = load_pretrained_encoder(network, path)

    encoder_state = network.encoder.state_dict()
    assert len(encoder_state) == 448  # stem + stages under every alias name
    for key, value in encoder_state.items():
        assert torch.equal(value, weights[f"encoder.{key}"]), key
    assert_untouched(network, before)
    parameters = sum(p.numel() for p in network.encoder.parameters())
    assert report["parameters"] == parameters
    assert round(report["parameters"] / 1e6, 2) == 90.30
    assert report["tensors"] == len(list(network.encoder.parameters()))
    assert report["checkpoint"] == path and report["stem"] == "encoder.stem"
    assert "90.30 M" in caplog.text and path in caplog.text


def test_full_size_checkpoint_into_tiny_network_names_first_key_and_both_shapes(resenc_l):
    path, _ = resenc_l
    network = tiny_network()
    encoder_before = {k: v.clone() for k, v in network.encoder.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_pretrained_encoder(network, path)
    message = str(info.value)
    assert path in message and "'stem.convs.0.conv.weight'" in message
    assert "(32, 1, 3, 3, 3)" in message and "(8, 1, 3, 3, 3)" in message
    for key, value in network.encoder.state_dict().items():  # nothing half-loaded
        assert torch.equal(value, encoder_before[key])


# ------------------------------------------------------------------------------------------- tiny checkpoints


@pytest.mark.parametrize(
    "checkpoint_config, network_config, key, shapes",
    [
        ({**TINY, "features_per_stage": (4, 8, 16, 16)}, TINY, "'stem.convs.0.conv.weight'",
         ("(4, 1, 3, 3, 3)", "(8, 1, 3, 3, 3)")),
        (TINY, {**TINY, "blocks_per_stage": (1, 2, 1, 1)}, "'stages.1.blocks.1.conv1.conv.weight'",
         ("checkpoint shape missing", "(16, 16, 3, 3, 3)")),
        ({**TINY, "blocks_per_stage": (1, 2, 1, 1)}, TINY, "'stages.1.blocks.1.conv1.conv.weight'",
         ("(16, 16, 3, 3, 3)", "network shape missing")),
    ],
)
def test_tiny_mismatch_names_first_key_and_both_shapes(tmp_path, checkpoint_config, network_config, key, shapes):
    path = write_checkpoint(pretraining_unet(**checkpoint_config), tmp_path / "ckpt.pth", checkpoint_config)
    with pytest.raises(ValueError) as info:
        load_pretrained_encoder(tiny_network(**network_config), path)
    message = str(info.value)
    assert path in message and key in message
    for shape in shapes:
        assert shape in message


def test_tiny_checkpoint_round_trip_and_plan(tmp_path):
    source = pretraining_unet(**TINY)
    path = write_checkpoint(source, tmp_path / "ckpt.pth", citations=[{"type": "Pretraining Method", "name": "MAE"}])
    checkpoint = read_checkpoint(path)
    plan = checkpoint["nnssl_adaptation_plan"]
    assert plan["key_to_encoder"] == "encoder.stages" and plan["key_to_stem"] == "encoder.stem"
    assert plan["keys_to_in_proj"] == ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]
    assert plan["architecture_plans"]["arch_class_name"] == "ResEncL"
    assert plan["architecture_plans"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 32]
    assert plan["pretrain_num_input_channels"] == 1
    assert checkpoint["citations"][0]["name"] == "MAE"

    state = encoder_state_dict(checkpoint)
    assert set(state) == set(source.encoder.state_dict())  # every alias name, nothing of the decoder
    network = tiny_network()
    before = outside_encoder(network)
    report = load_pretrained_encoder(network, path)
    for key, value in network.encoder.state_dict().items():
        assert torch.equal(value, source.encoder.state_dict()[key]), key
    assert_untouched(network, before)
    assert report["parameters"] == sum(p.numel() for p in network.encoder.parameters())


@pytest.mark.parametrize("channels", [2, 4])
def test_channel_adaptation_repeats_and_divides_the_in_projection(tmp_path, channels):
    source = pretraining_unet(**TINY)
    path = write_checkpoint(source, tmp_path / "ckpt.pth")
    network = tiny_network(in_channels=channels)
    load_pretrained_encoder(network, path)  # channels read off the network

    weight = source.encoder.stem.convs[0].conv.weight.detach()
    loaded = network.encoder.state_dict()
    for name in ("stem.convs.0.conv.weight", "stem.convs.0.all_modules.0.weight"):
        assert loaded[name].shape == (8, channels, 3, 3, 3)
        assert torch.allclose(loaded[name], weight.repeat(1, channels, 1, 1, 1) / channels)
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = source.encoder(image)
        adapted = network.encoder(image.repeat(1, channels, 1, 1, 1))
    for reference, output in zip(expected, adapted):
        assert torch.allclose(reference, output, rtol=1e-4, atol=1e-4)


def test_explicit_in_channels_that_contradict_the_network_fail(tmp_path):
    path = write_checkpoint(pretraining_unet(**TINY), tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match=r"stem\.convs\.0\.conv\.weight"):
        load_pretrained_encoder(tiny_network(in_channels=1), path, in_channels=3)


def test_adapt_input_channels_on_every_alias():
    weight = torch.randn(4, 1, 3, 3, 3)
    state = {"stem.a.weight": weight, "stem.b.weight": weight, "stem.a.bias": torch.zeros(4)}
    adapted = adapt_input_channels(state, ["stem.a", "stem.b"], 3)
    assert adapted["stem.a.weight"].shape == (4, 3, 3, 3, 3)
    assert torch.equal(adapted["stem.a.weight"], adapted["stem.b.weight"])
    assert torch.allclose(adapted["stem.a.weight"].sum(dim=1, keepdim=True), weight)
    assert torch.equal(adapted["stem.a.bias"], state["stem.a.bias"])
    assert state["stem.a.weight"] is weight  # input left alone
    assert adapt_input_channels(state, ["stem.a"], 1)["stem.a.weight"] is weight
    with pytest.raises(ValueError, match="single-channel"):
        adapt_input_channels({"stem.a.weight": torch.randn(4, 3, 3, 3, 3)}, ["stem.a"], 2)
    with pytest.raises(ValueError, match="none of the input-projection weights"):
        adapt_input_channels(state, ["stem.c"], 2)


# ------------------------------------------------------------------------------------------- missing / bad files


def test_missing_checkpoint_says_how_to_fetch_it(tmp_path):
    path = tmp_path / "models" / "checkpoint_final.pth"
    with pytest.raises(FileNotFoundError) as info:
        initialize_from_pretrained(tiny_network(), str(path), fetch_hint=MAE_URL)
    message = str(info.value)
    assert str(path) in message and MAE_URL in message
    assert f"python -m monai.bundle download_large_files --bundle_path {tmp_path}" in message


@pytest.mark.parametrize("path", ["", None, "   "])
def test_empty_path_is_a_no_op(path):
    network = tiny_network()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    assert initialize_from_pretrained(network, path) is None
    for key, value in network.state_dict().items():
        assert torch.equal(value, before[key])


def test_initialize_from_pretrained_loads_a_set_path(tmp_path):
    source = pretraining_unet(**TINY)
    path = write_checkpoint(source, tmp_path / "ckpt.pth")
    network = tiny_network(in_channels=2)
    report = initialize_from_pretrained(nn.parallel.DataParallel(network), path, in_channels=2)
    assert report["checkpoint"] == path
    loaded, pretrained = network.encoder.stages[0].blocks[0], source.encoder.stages[0].blocks[0]
    assert torch.equal(loaded.conv1.conv.weight, pretrained.conv1.conv.weight)


def test_unreadable_or_wrong_files_name_the_file(tmp_path):
    lfs_pointer = tmp_path / "pointer.pth"
    lfs_pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(ValueError, match="cannot be read") as info:
        read_checkpoint(str(lfs_pointer))
    assert str(lfs_pointer) in str(info.value) and "download_large_files" in str(info.value)

    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="not a dict") as info:
        read_checkpoint(str(not_a_dict))
    assert str(not_a_dict) in str(info.value)

    no_plan = tmp_path / "weights_only.pth"
    torch.save({"network_weights": {"encoder.stem.w": torch.zeros(1)}}, no_plan)
    with pytest.raises(ValueError, match="nnssl_adaptation_plan") as info:
        read_checkpoint(str(no_plan))
    assert str(no_plan) in str(info.value)

    no_weights = tmp_path / "plan_only.pth"
    torch.save({"nnssl_adaptation_plan": {}}, no_weights)
    with pytest.raises(ValueError, match="network_weights"):
        read_checkpoint(str(no_weights))


# ------------------------------------------------------------------------------------------- MultiTalent, VoCo

STEM_IDS = ("351_0", "004", "017")


def multitalent_checkpoint(tmp_path):
    """Three stems as siblings under encoder.stem.<id>, the CT stem 351_0 the plan's default."""
    source = pretraining_unet(**TINY)
    offsets = {"351_0": 0.0, "004": 1.0, "017": -2.0}
    weights = {}
    for key, value in source.state_dict().items():
        if key.startswith("encoder.stem."):
            for stem_id in STEM_IDS:
                weights[f"encoder.stem.{stem_id}.{key[len('encoder.stem.'):]}"] = value + offsets[stem_id]
        elif not key.startswith("decoder.encoder.stem."):
            weights[key] = value
    path = make_nnssl_checkpoint(weights, str(tmp_path / "multitalent.pth"), arch_kwargs(**TINY),
                                 key_to_stem="encoder.stem.351_0")
    return path, source, offsets


def test_multitalent_stems_listed_and_ct_stem_default(tmp_path):
    path, source, offsets = multitalent_checkpoint(tmp_path)
    checkpoint = read_checkpoint(path)
    assert available_stems(checkpoint) == [f"encoder.stem.{s}" for s in STEM_IDS]
    network = tiny_network()
    report = load_pretrained_encoder(network, path)
    assert report["stem"] == "encoder.stem.351_0"
    assert torch.equal(network.encoder.stem.convs[0].conv.weight, source.encoder.stem.convs[0].conv.weight)
    loaded, pretrained = network.encoder.stages[2].blocks[0], source.encoder.stages[2].blocks[0]
    assert torch.equal(loaded.conv2.conv.weight, pretrained.conv2.conv.weight)


@pytest.mark.parametrize("choice, stem_id", [("004", "004"), ("encoder.stem.017", "017"), (1, "004"), (-1, "017")])
def test_multitalent_other_stem_by_id_prefix_or_index(tmp_path, choice, stem_id):
    path, source, offsets = multitalent_checkpoint(tmp_path)
    assert select_stem(read_checkpoint(path), choice) == f"encoder.stem.{stem_id}"
    network = tiny_network(in_channels=2)
    report = load_pretrained_encoder(network, path, stem=choice)
    assert report["stem"] == f"encoder.stem.{stem_id}"
    expected = (source.encoder.stem.convs[0].conv.weight + offsets[stem_id]).repeat(1, 2, 1, 1, 1) / 2
    assert torch.allclose(network.encoder.stem.convs[0].conv.weight, expected)
    expected_bias = source.encoder.stem.convs[0].norm.bias + offsets[stem_id]
    assert torch.equal(network.encoder.stem.convs[0].norm.bias, expected_bias)


@pytest.mark.parametrize("choice", ["999", 3, "encoder.stem"])
def test_multitalent_unknown_stem_lists_the_available_ones(tmp_path, choice):
    path, _, _ = multitalent_checkpoint(tmp_path)
    with pytest.raises(ValueError) as info:
        load_pretrained_encoder(tiny_network(), path, stem=choice)
    message = str(info.value)
    assert path in message and repr(choice) in message
    for stem_id in STEM_IDS:
        assert stem_id in message


def test_single_stem_checkpoint_lists_one_stem(tmp_path):
    path = write_checkpoint(pretraining_unet(**TINY), tmp_path / "ckpt.pth")
    checkpoint = read_checkpoint(path)
    assert available_stems(checkpoint) == ["encoder.stem"]
    assert select_stem(checkpoint, 0) == "encoder.stem"
    with pytest.raises(ValueError, match="available stems"):
        select_stem(checkpoint, "004")


def test_voco_plan_with_other_pretraining_patch_loads_the_same(tmp_path):
    source = pretraining_unet(**TINY)
    weights = {f"encoder.{k}": v for k, v in source.encoder.state_dict().items()}
    weights.update({"projector.0.weight": torch.randn(64, 32), "projector.0.bias": torch.randn(64)})
    voco = make_nnssl_checkpoint(weights, str(tmp_path / "voco.pth"), None, pretrain_patch_size=(192, 192, 64))
    mae = write_checkpoint(source, tmp_path / "mae.pth")
    plan = read_checkpoint(voco)["nnssl_adaptation_plan"]
    assert plan["pretrain_plan"]["configurations"]["onemmiso"]["patch_size"] == [192, 192, 64]
    assert plan["architecture_plans"]["arch_kwargs"] is None

    from_voco, from_mae = tiny_network(), tiny_network()
    report_voco = load_pretrained_encoder(from_voco, voco)
    report_mae = load_pretrained_encoder(from_mae, mae)
    assert (report_voco["tensors"], report_voco["parameters"]) == (report_mae["tensors"], report_mae["parameters"])
    for key, value in from_voco.encoder.state_dict().items():
        assert torch.equal(value, from_mae.encoder.state_dict()[key]), key


# ------------------------------------------------------------------------------------------- native MultiTalent

NATIVE_TINY = {"features_per_stage": (8, 16, 32, 32), "strides": (1, 2, 2, 2)}
NATIVE_STEMS = ("351_0", "004")


def native_release_weights(features_per_stage, stems=NATIVE_STEMS, level0_blocks=1, seed=0) -> dict:
    """Pre-training weights in the native release layout: stems stem.<id>.{0 conv, 1 norm}, a single-block
    level 0, two-block deeper levels under backbone.levels.<s>.component.<b>, plus decoder / seg layers."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator) * 0.1

    width0 = features_per_stage[0]
    weights = {}
    for stem_id in stems:
        weights[f"stem.{stem_id}.0.weight"] = draw(width0, 1, 3, 3, 3)
        weights[f"stem.{stem_id}.1.weight"] = draw(width0)
        weights[f"stem.{stem_id}.1.bias"] = draw(width0)
    previous = width0
    for level, width in enumerate(features_per_stage):
        for block in range(level0_blocks if level == 0 else 2):
            in_channels = previous if block == 0 else width
            prefix = f"backbone.levels.{level}.component.{block}"
            weights[f"{prefix}.conv.weight"] = draw(width, in_channels, 3, 3, 3)
            weights[f"{prefix}.norm.weight"] = draw(width)
            weights[f"{prefix}.norm.bias"] = draw(width)
        previous = width
    weights["decoder.lateral.0.conv.weight"] = draw(8, width0, 1, 1, 1)
    weights["seg_layers.0.weight"] = draw(2, 8, 1, 1, 1)
    return weights


def write_native(weights, path) -> str:
    return make_nnssl_checkpoint(
        weights, str(path), {"features_per_stage": list(NATIVE_TINY["features_per_stage"]), "kernel_sizes": [3] * 4,
                             "strides": [2, 2, 2]},
        arch_class_name="ConvBackbone", key_to_encoder="backbone.levels", key_to_stem="stem.351_0",
        keys_to_in_proj=("stem.351_0.0",),
    )


def native_network(**overrides):
    kwargs = {**NATIVE_TINY, "num_anchors": 3, "fpn_channels": 16, "detection_levels": (2, 3)}
    return retina_unet_nndet(**{**kwargs, **overrides})


@pytest.mark.parametrize("stem, stem_id", [(None, "351_0"), ("004", "004")])
def test_native_fusion_puts_the_stem_first_in_level_0(tmp_path, stem, stem_id):
    weights = native_release_weights(NATIVE_TINY["features_per_stage"])
    path = write_native(weights, tmp_path / "native.pth")
    network = native_network()
    before = outside_encoder(network)
    report = initialize_from_pretrained(network, path, stem=stem)  # dispatches on the native encoder
    stages = network.encoder.stages
    assert torch.equal(stages[0][0].conv.weight, weights[f"stem.{stem_id}.0.weight"])
    assert torch.equal(stages[0][0].norm.weight, weights[f"stem.{stem_id}.1.weight"])
    assert torch.equal(stages[0][0].norm.bias, weights[f"stem.{stem_id}.1.bias"])
    assert torch.equal(stages[0][1].conv.weight, weights["backbone.levels.0.component.0.conv.weight"])
    assert torch.equal(stages[0][1].norm.bias, weights["backbone.levels.0.component.0.norm.bias"])
    for level in range(1, 4):
        for block in range(2):
            for layer, name in (("conv", "weight"), ("norm", "weight"), ("norm", "bias")):
                loaded = getattr(getattr(stages[level][block], layer), name)
                assert torch.equal(loaded, weights[f"backbone.levels.{level}.component.{block}.{layer}.{name}"])
    assert_untouched(network, before)
    assert report["stem"] == f"stem.{stem_id}"
    assert report["tensors"] == len(list(network.encoder.parameters()))
    assert report["parameters"] == sum(p.numel() for p in network.encoder.parameters())


def test_native_fusion_adapts_channels_and_rejects_mismatches(tmp_path):
    weights = native_release_weights(NATIVE_TINY["features_per_stage"])
    path = write_native(weights, tmp_path / "native.pth")
    network = native_network(in_channels=3)
    load_native_multitalent(network, path)
    expected = weights["stem.351_0.0.weight"].repeat(1, 3, 1, 1, 1) / 3
    assert torch.allclose(network.encoder.stages[0][0].conv.weight, expected)

    wider = write_native(native_release_weights((16, 32, 64, 64)), tmp_path / "wider.pth")
    with pytest.raises(ValueError) as info:
        load_native_multitalent(native_network(), wider)
    message = str(info.value)
    assert wider in message and "'stages.0.0.conv.weight'" in message
    assert "(16, 1, 3, 3, 3)" in message and "(8, 1, 3, 3, 3)" in message

    two_blocks = write_native(native_release_weights(NATIVE_TINY["features_per_stage"], level0_blocks=2),
                              tmp_path / "two_blocks.pth")
    with pytest.raises(ValueError, match="level 0"):
        load_native_multitalent(native_network(), two_blocks)

    with pytest.raises(ValueError, match="available stems"):
        load_native_multitalent(native_network(), path, stem="999")
