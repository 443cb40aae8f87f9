"""Released-format checkpoints through the bundles' own train.json `initialize` (pretrained_checkpoint override)."""

from __future__ import annotations

import os

import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from monai.bundle import ConfigWorkflow
from monai.utils import set_determinism

from bundle_helpers import bundle_dir, easy_dataset_with_plans, error_chain, smoke_settings
from meddet.pretrained.nnssl import make_nnssl_checkpoint


def _resenc_unet(features, strides, blocks):
    return ResidualEncoderUNet(1, len(features), features, torch.nn.Conv3d, 3, strides, blocks, 1, 1, True,
                               torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                               torch.nn.LeakyReLU, {"inplace": True}, block=BasicBlockD)


def _checkpoint(path, features, strides, blocks, seed=123):
    torch.manual_seed(seed)
    unet = _resenc_unet(features, strides, blocks)
    kwargs = {"features_per_stage": features, "strides": strides, "n_blocks_per_stage": blocks}
    make_nnssl_checkpoint(unet.state_dict(), str(path), kwargs)
    return {k: v for k, v in unet.state_dict().items() if k.startswith("encoder.")}


def _workflow(name, run_root, configs=("train.json",), **overrides):
    folder = os.path.join(bundle_dir(name), "configs")
    workflow = ConfigWorkflow(config_file=[os.path.join(folder, c) for c in configs], workflow_type="train",
                              bundle_root=str(run_root), **overrides)
    return workflow


def _assert_encoder_loaded(network, expected):
    state = network.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    return state


@pytest.mark.parametrize("name", ["retinaunet_resencl_mae_detection", "defdetr_resencl_mae_detection"])
def test_full_size_released_checkpoint_loads_through_initialize(name, tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    encoder = _checkpoint(path, [32, 64, 128, 256, 320, 320], [1, 2, 2, 2, 2, 2], [1, 3, 4, 6, 6, 6])
    workflow = _workflow(name, tmp_path / "run", pretrained_checkpoint=str(path))
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network_def")
    state = _assert_encoder_loaded(network, encoder)
    assert len(encoder) == 448  # every stem/stage tensor under all its alias names

    # everything outside the encoder keeps its own (seeded) initialisation
    set_determinism(seed=0)
    reference = workflow.parser.get_parsed_content("network_def", instantiate=True, lazy=False)
    set_determinism(seed=None)
    for key, value in reference.state_dict().items():
        if not key.startswith("encoder."):
            assert torch.equal(state[key], value), key
    assert not all(torch.equal(state[k], v) for k, v in reference.state_dict().items() if k.startswith("encoder."))


def test_missing_checkpoint_stops_a_pretrained_bundle_before_training(tmp_path):
    missing = tmp_path / "models" / "checkpoint_final.pth"
    # the full-size configuration says how to download the released checkpoint
    workflow = _workflow("retinaunet_resencl_voco_detection", tmp_path, configs=("train.json", "smoke.json"),
                         pretrained_checkpoint=str(missing), pretrained_missing_hint="")
    with pytest.raises(Exception) as error:
        workflow.initialize()
    message = error_chain(error.value)
    assert "FileNotFoundError" in message and "download_large_files" in message
    assert "ResEncL-MissingPiece-VoCo" in message
    assert not os.path.exists(tmp_path / "models" / "checkpoint_latest.pt")
    # the smoke preset says how to pre-train a smoke-size one instead
    workflow = _workflow("retinaunet_resencl_voco_detection", tmp_path, configs=("train.json", "smoke.json"),
                         pretrained_checkpoint=str(missing))
    with pytest.raises(Exception) as error:
        workflow.initialize()
    message = error_chain(error.value)
    assert "FileNotFoundError" in message and "resencl_simclr_pretraining" in message and str(missing) in message
    assert not os.path.exists(tmp_path / "models" / "checkpoint_latest.pt")


def test_default_checkpoint_location_is_the_bundles_models_folder(tmp_path):
    workflow = _workflow("retinaunet_resencl_s3d_detection", tmp_path, configs=("train.json", "smoke.json"))
    workflow.parser["pretrained_checkpoint"] = "$@bundle_root + '/models/checkpoint_final.pth'"
    with pytest.raises(Exception) as error:
        workflow.initialize()
    assert str(tmp_path / "models" / "checkpoint_final.pth") in error_chain(error.value)


def test_mismatching_checkpoint_is_refused_with_the_offending_key(tmp_path):
    path = tmp_path / "tiny.pth"
    _checkpoint(path, [4, 8, 16, 16], [1, 2, 2, 2], [1, 1, 1, 1])
    workflow = _workflow("retinaunet_resencl_mg_detection", tmp_path, configs=("train.json", "smoke.json"),
                         pretrained_checkpoint=str(path))
    with pytest.raises(Exception) as error:
        workflow.initialize()
    message = error_chain(error.value)
    assert "stem.convs.0" in message and str(path) in message


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained_data")
    data_dir, datalist, plans = easy_dataset_with_plans(str(root), "retinaunet_resencl_mae_detection",
                                                        num_training=4, num_validation=2)
    return {"dataset_dir": data_dir, "data_list_file_path": datalist, "plans": plans}


@pytest.mark.parametrize("name", ["retinaunet_resencl_mae_detection", "defdetr_resencl_multitalent_detection"])
def test_tiny_released_checkpoint_goes_through_the_whole_fine_tuning_path(name, smoke_data, tmp_path):
    smoke = smoke_settings(name)
    path = tmp_path / "models" / "checkpoint_final.pth"
    os.makedirs(path.parent)
    encoder = _checkpoint(path, smoke["encoder_features"], smoke["encoder_strides"], smoke["encoder_blocks"])
    folder = os.path.join(bundle_dir(name), "configs")
    workflow = ConfigWorkflow(
        config_file=[os.path.join(folder, "train.json"), os.path.join(folder, "smoke.json"), smoke_data["plans"]],
        workflow_type="train", bundle_root=str(tmp_path), dataset_dir=smoke_data["dataset_dir"],
        data_list_file_path=smoke_data["data_list_file_path"], pretrained_checkpoint=str(path),
        max_epochs=1, epoch_length=3, val_interval=1, warmup_iterations=1, num_workers=0)
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network_def")
    _assert_encoder_loaded(network, encoder)
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 3
    # fine-tuning changed the encoder (no freezing by default) and wrote the best model
    assert any(not torch.equal(network.state_dict()[k], v) for k, v in encoder.items() if v.is_floating_point())
    assert os.path.exists(tmp_path / "models" / "model.pt")
