"""Pre-training: masks, losses, crops, the nnssl-format checkpoint the bundles write, and fine-tuning from it."""

from __future__ import annotations

import json
import os
import pydoc
import sys

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from bundle_helpers import bundle_dir, easy_dataset_with_plans, error_chain, run_bundle
from meddet.data import DatalistError, load_datalist
from meddet.pretraining import (
    MaskedReconstruction,
    OverlappingCropPaird,
    block_mask,
    build_resenc_unet,
    nt_xent_loss,
    resenc_unet_arch_kwargs,
)

MAE = "resencl_mae_pretraining"
SIMCLR = "resencl_simclr_pretraining"
SMOKE_ENCODER = ([8, 16, 32, 32], [1, 2, 2, 2], [1, 1, 1, 1])


# ---------------------------------------------------------------------------------------------- units


def test_block_mask_hides_the_ratio_of_whole_blocks():
    generator = torch.Generator().manual_seed(3)
    keep = block_mask(3, (32, 32, 16), block_size=8, mask_ratio=0.75, generator=generator)
    assert keep.shape == (3, 1, 32, 32, 16)
    blocks = keep.reshape(3, 4, 8, 4, 8, 2, 8)
    # constant inside every 8^3 block, and int(0.75 * 32) of the 32 blocks hidden in each sample
    assert torch.equal(blocks.amax(dim=(2, 4, 6)), blocks.amin(dim=(2, 4, 6)))
    assert [int((1 - blocks[b, :, 0, :, 0, :, 0]).sum()) for b in range(3)] == [24, 24, 24]
    assert not torch.equal(keep[0], keep[1])  # each sample draws its own mask
    again = block_mask(3, (32, 32, 16), 8, 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(keep, again)
    with pytest.raises(ValueError, match="multiple"):
        block_mask(1, (30, 32, 32), 8, 0.75)


class _Oracle(torch.nn.Module):
    """Returns `truth` on masked voxels and garbage where the input is visible."""

    def __init__(self, truth):
        super().__init__()
        self.truth = truth

    def forward(self, masked):
        return torch.where(masked == 0, self.truth, torch.full_like(masked, 100.0))


def test_masked_reconstruction_scores_only_the_masked_voxels():
    image = torch.randn(2, 1, 16, 16, 16) + 5.0  # no exact zeros in the visible part
    samples = [{"image": image[0]}, {"image": image[1]}]
    objective = MaskedReconstruction(mask_ratio=0.5, block_size=4)
    perfect = objective(_Oracle(image), samples, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert float(perfect["loss"]) == pytest.approx(0.0, abs=1e-6)
    assert torch.count_nonzero(perfect["masked"] == 0) == image.numel() // 2

    zeros = objective(lambda x: torch.zeros_like(x), samples, torch.device("cpu"), torch.Generator().manual_seed(0))
    hidden = perfect["masked"] == 0
    assert float(zeros["loss"]) == pytest.approx(float((image[hidden] ** 2).mean()), rel=1e-5)


def test_nt_xent_matches_the_formula_and_finds_partners():
    torch.manual_seed(0)
    z_1, z_2 = torch.randn(3, 5), torch.randn(3, 5)
    loss, _ = nt_xent_loss(z_1, z_2, temperature=0.5)
    z = torch.nn.functional.normalize(torch.cat([z_1, z_2]), dim=1).numpy()
    expected = []
    for i in range(6):
        partner = (i + 3) % 6
        logits = np.array([z[i] @ z[k] / 0.5 for k in range(6) if k != i])
        others = [k for k in range(6) if k != i]
        expected.append(-logits[others.index(partner)] + np.log(np.exp(logits).sum()))
    assert float(loss) == pytest.approx(np.mean(expected), rel=1e-5)

    basis = torch.eye(4)
    loss, accuracy = nt_xent_loss(basis, basis * 2, temperature=0.1)  # partners identical up to scale
    assert float(accuracy) == 1.0 and float(loss) < 1e-3


def test_overlapping_crops_keep_the_minimum_overlap_inside_the_patch():
    transform = OverlappingCropPaird((16, 16, 8), min_overlap=0.5)
    transform.set_random_state(seed=0)
    image = torch.arange(40 * 40 * 16, dtype=torch.float32).reshape(1, 40, 40, 16)
    for _ in range(100):
        first, second = transform.origins(image.shape[1:])
        assert np.all(first >= 0) and np.all(second >= 0) and np.all(second + (16, 16, 8) <= (40, 40, 16))
        overlap = np.prod(np.clip(np.array([16, 16, 8]) - np.abs(second - first), 0, None) / [16, 16, 8])
        assert overlap >= 0.5
    out = transform({"image": image})
    assert out["image"].shape == out["image_pair"].shape == (1, 16, 16, 8)
    fixed = OverlappingCropPaird((16, 16, 8), min_overlap=0.5, deterministic=True)
    first, second = fixed.origins((40, 40, 16))
    assert np.array_equal(first, [12, 12, 4]) and np.array_equal(second - first, [3, 3, 1])


def _reference_unet(arch_kwargs: dict, in_channels=1) -> ResidualEncoderUNet:
    """dynamic-network-architectures' ResidualEncoderUNet built directly from nnssl-style arch_kwargs, as a user
    of the released checkpoints does (import strings resolved)."""
    kwargs = {k: (pydoc.locate(v) if k in ("conv_op", "norm_op", "nonlin") else v) for k, v in arch_kwargs.items()}
    return ResidualEncoderUNet(input_channels=in_channels, num_classes=1, block=BasicBlockD, **kwargs)


def test_full_size_arch_kwargs_rebuild_the_released_resenc_l():
    arch = resenc_unet_arch_kwargs([32, 64, 128, 256, 320, 320], [1, 2, 2, 2, 2, 2], [1, 3, 4, 6, 6, 6])
    ours = build_resenc_unet(arch)
    reference = _reference_unet(arch)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    distinct = {id(p): p.numel() for p in ours.parameters()}
    assert round(sum(distinct.values()) / 1e6, 2) == 102.35  # DESIGN §3: whole ResEnc-L U-Net
    assert json.loads(json.dumps(arch)) == arch  # plain JSON values only


def test_unlabeled_datalist_ignores_boxes_and_still_checks_images(tmp_path):
    data_dir, datalist, _ = easy_dataset_with_plans(str(tmp_path), "retinaunet_resencl_scratch_detection",
                                                    num_training=2, num_validation=1)
    with open(datalist) as f:
        content = json.load(f)
    content["training"][0]["box"] = [[1e6, 0, 0, 5, 5, 5]]  # outside the image: ignored without labels
    content["training"][1]["label"] = "not a list"
    content["validation"] = [{"image": "imagesTr/missing.nii.gz"}]
    path = tmp_path / "unlabeled.json"
    path.write_text(json.dumps(content))
    items = load_datalist(str(path), data_dir, "training", labels=False)
    assert len(items) == 2 and all("box" not in item and "label" not in item for item in items)
    with pytest.raises(DatalistError, match="missing.nii.gz"):
        load_datalist(str(path), data_dir, "validation", labels=False)


def test_mae_training_patches_drop_labels_and_keep_their_size(tmp_path):
    from meddet.pretraining import mae_transforms

    data_dir, datalist, _ = easy_dataset_with_plans(str(tmp_path), "retinaunet_resencl_scratch_detection",
                                                    num_training=1, num_validation=0)
    item = load_datalist(datalist, data_dir, "training")[0]
    transform = mae_transforms([32, 32, 24], [1.5, 1.5, 2.0], "zscore", train=True, spatial_augmentation=True)
    transform.set_random_state(seed=0)
    patches = [transform(dict(item)) for _ in range(8)]
    assert all(sorted(p) == ["image"] and p["image"].shape == (1, 32, 32, 24) for p in patches)
    assert all(torch.isfinite(p["image"]).all() for p in patches)
    assert not torch.equal(patches[0]["image"], patches[1]["image"])
    # the full recipe rotates and scales (nnssl's MAE); the 32^3 smoke preset does not
    with open(os.path.join(bundle_dir(MAE), "configs", "train.json")) as f:
        assert json.load(f)["spatial_augmentation"] is True
    with open(os.path.join(bundle_dir(MAE), "configs", "smoke.json")) as f:
        assert json.load(f)["spatial_augmentation"] is False


# ---------------------------------------------------------------------------------------------- bundles


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretraining_data")
    data_dir, datalist, plans = easy_dataset_with_plans(str(root), "retinaunet_resencl_mae_detection",
                                                        num_training=6, num_validation=2)
    return {"dataset_dir": data_dir, "data_list_file_path": datalist, "plans": plans, "root": root}


SHORT = {"max_epochs": 2, "epoch_length": 3, "val_interval": 1, "batch_size": 2}


@pytest.fixture(scope="module")
def pretrained(corpus):
    """Both pre-training bundles run with the standard command (smoke preset, CT intensities of the plan)."""
    runs = {}
    for name in (MAE, SIMCLR):
        run_root = corpus["root"] / name
        run_bundle(name, ["configs/train.json", "configs/smoke.json", corpus["plans"]],
                   str(corpus["root"] / f"{name}.log"), bundle_root=str(run_root),
                   dataset_dir=corpus["dataset_dir"], data_list_file_path=corpus["data_list_file_path"], **SHORT)
        runs[name] = run_root
    return runs


def _checkpoint(pretrained, name):
    return torch.load(pretrained[name] / "models" / "checkpoint_final.pth", map_location="cpu", weights_only=True)


def test_mae_bundle_writes_a_released_format_checkpoint_that_rebuilds_its_network(pretrained):
    checkpoint = _checkpoint(pretrained, MAE)
    plan = checkpoint["nnssl_adaptation_plan"]
    arch = plan["architecture_plans"]["arch_kwargs"]
    assert plan["architecture_plans"]["arch_class_name"] == "ResidualEncoderUNet"
    assert arch["features_per_stage"] == SMOKE_ENCODER[0] and arch["n_blocks_per_stage"] == SMOKE_ENCODER[2]
    unet = _reference_unet(arch)
    unet.load_state_dict(checkpoint["network_weights"], strict=True)
    configuration = next(iter(plan["pretrain_plan"]["configurations"].values()))
    assert configuration["patch_size"] == [32, 32, 32] and configuration["spacing"] == [1.5, 1.5, 2.0]
    assert configuration["normalization_schemes"] == ["CTNormalization"]
    assert plan["recommended_downstream_patchsize"] == [32, 32, 32]
    assert plan["key_to_encoder"] == "encoder.stages" and plan["key_to_stem"] == "encoder.stem"
    assert plan["keys_to_in_proj"] == ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]
    assert plan["pretrain_num_input_channels"] == 1 and checkpoint["current_epoch"] == 2
    # pre-training moved the weights away from a fresh network's
    fresh = build_resenc_unet(arch).state_dict()
    assert any(not torch.equal(fresh[k], v)
               for k, v in checkpoint["network_weights"].items() if k.startswith("encoder."))
    # progress: reconstruction pictures and TensorBoard events
    assert os.listdir(pretrained[MAE] / "eval" / "reconstruction")
    assert any(f.startswith("events.") for f in os.listdir(pretrained[MAE] / "eval" / "tensorboard"))


def test_simclr_bundle_checkpoint_encoder_loads_into_a_resenc_unet(pretrained):
    checkpoint = _checkpoint(pretrained, SIMCLR)
    plan = checkpoint["nnssl_adaptation_plan"]
    weights = checkpoint["network_weights"]
    assert any(k.startswith("projector.") for k in weights)
    encoder = _reference_unet(plan["architecture_plans"]["arch_kwargs"]).encoder
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")},
                            strict=True)
    assert next(iter(plan["pretrain_plan"]["configurations"].values()))["patch_size"] == [32, 32, 32]


def test_evaluate_config_scores_the_final_checkpoint(pretrained, corpus, tmp_path):
    run_bundle(MAE, ["configs/train.json", "configs/evaluate.json", "configs/smoke.json", corpus["plans"]],
               str(tmp_path / "evaluate.log"), bundle_root=str(pretrained[MAE]), output_dir=str(tmp_path / "eval"),
               dataset_dir=corpus["dataset_dir"], data_list_file_path=corpus["data_list_file_path"])
    with open(tmp_path / "eval" / "metrics.json") as f:
        metrics = json.load(f)
    assert 0 < metrics["val_loss"] < 10 and os.path.exists(metrics["reconstruction_png"])


def _detection_workflow(name, corpus, run_root, **overrides):
    folder = os.path.join(bundle_dir(name), "configs")
    workflow = ConfigWorkflow(
        config_file=[os.path.join(folder, "train.json"), os.path.join(folder, "smoke.json"), corpus["plans"]],
        workflow_type="train", bundle_root=str(run_root), dataset_dir=corpus["dataset_dir"],
        data_list_file_path=corpus["data_list_file_path"], max_epochs=1, epoch_length=2, val_interval=5,
        warmup_iterations=1, num_workers=0, **overrides)
    workflow.initialize()
    return workflow


@pytest.mark.parametrize("name", ["retinaunet_resencl_mae_detection", "defdetr_resencl_mae_detection"])
def test_pretrained_smoke_preset_fine_tunes_from_the_pretraining_bundles_checkpoint(name, pretrained, corpus,
                                                                                      tmp_path):
    path = str(pretrained[MAE] / "models" / "checkpoint_final.pth")
    expected = {k: v for k, v in _checkpoint(pretrained, MAE)["network_weights"].items() if k.startswith("encoder.")}
    runs = {}
    for arm, overrides in (("pretrained", {"pretrained_checkpoint": path}), ("scratch", {"pretrained_checkpoint": ""})):
        workflow = _detection_workflow(name, corpus, tmp_path / arm, **overrides)
        state = workflow.parser.get_parsed_content("network_def").state_dict()
        if arm == "pretrained":
            for key, value in expected.items():  # every stem/stage tensor, under all alias names
                assert torch.equal(state[key], value), key
        else:
            assert not all(torch.equal(state[k], v) for k, v in expected.items())
        trainer = workflow.parser.get_parsed_content("train#trainer")
        losses = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
        workflow.run()
        runs[arm] = losses
    assert len(runs["pretrained"]) == 2 and runs["pretrained"] != runs["scratch"]


@pytest.mark.parametrize("name, source", [("retinaunet_resencl_mae_detection", MAE),
                                          ("defdetr_resencl_voco_detection", SIMCLR)])
def test_pretrained_smoke_preset_never_falls_back_to_scratch(name, source, corpus, tmp_path):
    with pytest.raises(Exception) as error:
        _detection_workflow(name, corpus, tmp_path)
    message = error_chain(error.value)
    assert "FileNotFoundError" in message and f"bundles/{source}" in message
    assert str(tmp_path / "models" / "checkpoint_final.pth") in message


def _pretraining_workflow(corpus, run_root, **overrides):
    folder = os.path.join(bundle_dir(MAE), "configs")
    workflow = ConfigWorkflow(
        config_file=[os.path.join(folder, "train.json"), os.path.join(folder, "smoke.json"), corpus["plans"]],
        workflow_type="train", bundle_root=str(run_root), dataset_dir=corpus["dataset_dir"],
        data_list_file_path=corpus["data_list_file_path"],
        **{"max_epochs": 2, "epoch_length": 5, "val_interval": 10, "checkpoint_interval": 3, "batch_size": 2,
           **overrides})
    workflow.initialize()
    return workflow


def test_killed_pretraining_resumes_at_the_same_iteration_and_learning_rate(corpus, tmp_path):
    def recorder(workflow, record):
        trainer = workflow.parser.get_parsed_content("train#trainer")
        optimizer = workflow.parser.get_parsed_content("optimizer")
        trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                  lambda e: record.append((e.state.iteration, optimizer.param_groups[0]["lr"])))
        return trainer

    reference = []
    uninterrupted = _pretraining_workflow(corpus, tmp_path / "a")
    recorder(uninterrupted, reference)
    uninterrupted.run()

    interrupted = _pretraining_workflow(corpus, tmp_path / "b")
    trainer = interrupted.parser.get_parsed_content("train#trainer")

    def kill(engine):
        raise RuntimeError("killed at iteration 7")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=7), kill)
    with pytest.raises(Exception):
        interrupted.run()
    assert not os.path.exists(tmp_path / "b" / "models" / "checkpoint_final.pth")

    resumed_record = []
    resumed = _pretraining_workflow(corpus, tmp_path / "b")
    recorder(resumed, resumed_record)
    resumed.run()
    assert [it for it, _ in resumed_record] == [8, 9, 10]
    assert [lr for _, lr in resumed_record] == pytest.approx([lr for _, lr in reference[7:]], rel=1e-9)
    assert os.path.exists(tmp_path / "b" / "models" / "checkpoint_final.pth")


@pytest.mark.slow
def test_two_process_gloo_pretraining(corpus, tmp_path):
    run_root = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519"]
    run_bundle(MAE, ["configs/train.json", "configs/multi_gpu_train.json", "configs/smoke.json", corpus["plans"]],
               str(tmp_path / "ddp.log"), launcher=launcher, bundle_root=str(run_root),
               dataset_dir=corpus["dataset_dir"], data_list_file_path=corpus["data_list_file_path"],
               max_epochs=1, epoch_length=2, val_interval=1, batch_size=4)
    checkpoint = torch.load(run_root / "models" / "checkpoint_final.pth", weights_only=True)
    assert checkpoint["current_iteration"] == 2
    with open(tmp_path / "ddp.log", encoding="utf-8", errors="replace") as f:
        assert "re-load into a freshly built encoder" in f.read()


@pytest.mark.slow
def test_pretraining_study_quick_writes_table_plot_and_rows(tmp_path):
    import pretraining_study

    result = pretraining_study.study(str(tmp_path / "study"), quick=True)
    rows = result["rows"]
    settings = pretraining_study.SETTINGS["quick"]
    assert {(r["arm"], r["budget"], r["seed"]) for r in rows} == {
        (arm, budget, seed) for arm in ("scratch", "mae", "simclr") for budget in settings["budgets"]
        for seed in settings["seeds"]}
    for row in rows:
        assert all(0.0 <= row[m] <= 1.0 for m in ("AP@0.1", "mAP@[0.1:0.5]", "FROC"))
    with open(tmp_path / "study" / "results.md") as f:
        table = f.read()
    assert "Paired difference to scratch" in table and table.count("| mae |") == 2 * len(settings["budgets"])
    with open(tmp_path / "study" / "results.csv") as f:
        assert len(f.read().strip().splitlines()) == len(rows) + 1
    assert os.path.getsize(tmp_path / "study" / "results.png") > 10000
    # the study continues where it stopped: a second call reuses every finished run
    again = pretraining_study.study(str(tmp_path / "study"), quick=True)
    assert again["rows"] == rows and again["stages"]["fine-tuning and evaluation"] < 5
