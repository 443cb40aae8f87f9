import copy
import json
import os
import subprocess
import sys

import pytest

import generate_bundles
from variants import VARIANTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DETECTION = [v for v in VARIANTS if v["kind"] == "detection"]
PRETRAINING = [v for v in VARIANTS if v["kind"] == "pretraining"]


def test_committed_bundles_match_the_variant_table():
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "generate_bundles.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_when_the_table_changes_without_regenerating():
    changed = copy.deepcopy(VARIANTS)
    changed[3]["version"] = "0.1.1"
    stale = generate_bundles.differences(REPO, changed)
    assert stale == [f"bundles/{changed[3]['name']}/configs/metadata.json (differs)"]
    assert generate_bundles.differences(REPO, VARIANTS) == []


def test_every_detection_bundle_has_the_model_zoo_keys():
    for variant in DETECTION:
        configs = os.path.join(REPO, "bundles", variant["name"], "configs")
        with open(os.path.join(configs, "train.json")) as f:
            train = json.load(f)
        with open(os.path.join(configs, "inference.json")) as f:
            inference = json.load(f)
        for key in ("bundle_root", "device", "dataset_dir", "data_list_file_path", "output_dir", "ckpt_dir", "amp",
                    "patch_size", "network_def", "network", "inferer", "detector", "detector_ops",
                    "initialize", "run", "finalize"):
            assert key in train and key in inference, key
        assert "trainer" in train["train"] and "max_epochs" in train["train"]["trainer"]
        assert {"dataset", "handlers", "preprocessing"} <= set(train["train"])
        assert {"evaluator", "handlers", "dataset"} <= set(train["validate"])
        assert {"preprocessing", "postprocessing"} <= set(inference)
        with open(os.path.join(configs, "metadata.json")) as f:
            metadata = json.load(f)
        assert metadata["version"] == variant["version"] and variant["version"] in metadata["changelog"]
        assert "meddet" in metadata["required_packages_version"]


def test_every_pretraining_bundle_has_the_workflow_keys():
    for variant in PRETRAINING:
        configs = os.path.join(REPO, "bundles", variant["name"], "configs")
        with open(os.path.join(configs, "train.json")) as f:
            train = json.load(f)
        for key in ("bundle_root", "device", "dataset_dir", "data_list_file_path", "output_dir", "ckpt_dir", "amp",
                    "patch_size", "network_def", "network", "arch_kwargs", "objective", "checkpoint_writer",
                    "initialize", "run", "finalize"):
            assert key in train, key
        assert {"dataset", "handlers", "preprocessing", "trainer"} <= set(train["train"])
        assert "max_epochs" in train["train"]["trainer"]
        for entry in ("evaluate.json", "multi_gpu_train.json", "smoke.json", "logging.conf", "metadata.json"):
            assert os.path.exists(os.path.join(configs, entry)), entry
        # its smoke encoder is the detectors' smoke encoder, so the checkpoint feeds their smoke presets
        with open(os.path.join(configs, "smoke.json")) as f:
            smoke = json.load(f)
        with open(os.path.join(REPO, "bundles", "retinaunet_resencl_mae_detection", "configs", "smoke.json")) as f:
            detector_smoke = json.load(f)
        for key in ("encoder_features", "encoder_strides", "encoder_blocks", "spacing"):
            assert smoke[key] == detector_smoke[key], key


def test_smoke_preset_overrides_only_top_level_keys():
    # one smoke file merges over train.json, evaluate.json and inference.json alike only if it never
    # reaches into a nested section that one of them lacks
    for variant in VARIANTS:
        with open(os.path.join(REPO, "bundles", variant["name"], "configs", "smoke.json")) as f:
            smoke = json.load(f)
        assert all("#" not in key and "::" not in key for key in smoke)


def test_the_collection_has_every_detector_and_initialisation():
    names = {v["name"] for v in VARIANTS}
    inits = ("scratch", "mae", "s3d", "mg", "voco", "multitalent")
    assert names == ({f"retinaunet_resencl_{i}_detection" for i in inits}
                     | {f"defdetr_resencl_{i}_detection" for i in inits}
                     | {"retinaunet_nndet_scratch_detection", "retinaunet_nndet_multitalent_detection"}
                     | {"resencl_mae_pretraining", "resencl_simclr_pretraining"})


def test_pretrained_bundles_fetch_their_released_checkpoint():
    for variant in DETECTION:
        folder = os.path.join(REPO, "bundles", variant["name"])
        with open(os.path.join(folder, "configs", "train.json")) as f:
            train = json.load(f)
        if variant["initialisation"] == "scratch":
            assert train["pretrained_checkpoint"] == ""
            assert not os.path.exists(os.path.join(folder, "large_files.yml"))
            continue
        repo = {"multitalent_native": "RetinaUNet-MissingPiece-MultiTalent"}.get(
            variant["initialisation"], f"ResEncL-MissingPiece-{variant['initialisation']}")
        with open(os.path.join(folder, "large_files.yml")) as f:
            text = f.read()
        url = f"https://huggingface.co/MIC-DKFZ/{repo}/resolve/main/checkpoint_final.pth"
        assert url.lower() in text.lower() and "models/checkpoint_final.pth" in text
        assert train["pretrained_checkpoint"] == "$@bundle_root + '/models/checkpoint_final.pth'"
        assert any("initialize_from_pretrained" in step for step in train["initialize"])
        with open(os.path.join(folder, "configs", "metadata.json")) as f:
            pretraining = json.load(f)["meddet"]["pretraining"]
        assert pretraining["source"].lower() == url.lower() and pretraining["license"] == "CC-BY-4.0"


def test_bundle_names_must_contain_detection():
    bad = copy.deepcopy(VARIANTS[:1])
    bad[0]["name"] = "retinaunet_resencl_scratch"
    with pytest.raises(ValueError, match="detection"):
        generate_bundles.render_all(bad)


def test_the_readme_benchmark_table_is_rendered_from_the_measured_figures(tmp_path):
    with open(os.path.join(REPO, "README.md")) as f:
        committed = f.read()
    assert generate_bundles.readme_with_benchmarks(REPO) == committed
    (tmp_path / "README.md").write_text(committed.replace("| 21.4 patches/s |", "| 99.9 patches/s |"))
    assert generate_bundles.readme_with_benchmarks(str(tmp_path)) == committed  # a hand edit is rendered away
    (tmp_path / "README.md").write_text("# no table here\n")
    with pytest.raises(ValueError, match="README.md: no <!-- benchmarks -->"):
        generate_bundles.readme_with_benchmarks(str(tmp_path))
