"""Training workflow behaviour of the first bundle: resume, multi-process DDP, bad input before training."""

from __future__ import annotations

import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from bundle_helpers import bundle_dir, easy_dataset_with_plans, error_chain, run_bundle

BUNDLE = "retinaunet_resencl_scratch_detection"

# a few iterations without validation: enough to exercise the schedule and checkpoints
SHORT = {"max_epochs": 2, "epoch_length": 5, "val_interval": 100, "checkpoint_interval": 3,
         "warmup_iterations": 4, "num_workers": 0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    data_dir, datalist, plans = easy_dataset_with_plans(str(root), BUNDLE, num_training=6, num_validation=2)
    return {"data_dir": data_dir, "datalist": datalist, "plans": plans}


def _workflow(dataset, run_root, extra_configs=(), **overrides):
    configs = os.path.join(bundle_dir(BUNDLE), "configs")
    files = [os.path.join(configs, "train.json"), *extra_configs, os.path.join(configs, "smoke.json"),
             dataset["plans"]]
    workflow = ConfigWorkflow(config_file=files, workflow_type="train", bundle_root=str(run_root),
                              dataset_dir=dataset["data_dir"], data_list_file_path=dataset["datalist"],
                              **{**SHORT, **overrides})
    workflow.initialize()
    return workflow


class _Killed(RuntimeError):
    pass


def _kill_at(iteration):
    def handler(engine):
        raise _Killed(f"stopped at iteration {iteration}")
    return Events.ITERATION_COMPLETED(once=iteration), handler


def _final_state(workflow):
    trainer = workflow.parser.get_parsed_content("train#trainer")
    optimizer = workflow.parser.get_parsed_content("optimizer")
    return trainer, optimizer


def _record_lr(workflow, record):
    trainer, optimizer = _final_state(workflow)
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: record.append((e.state.iteration, optimizer.param_groups[0]["lr"])))
    return trainer


def test_resumed_run_ends_where_an_uninterrupted_run_ends(dataset, tmp_path):
    reference = []
    uninterrupted = _workflow(dataset, tmp_path / "a")
    trainer_a = _record_lr(uninterrupted, reference)
    uninterrupted.run()

    interrupted = _workflow(dataset, tmp_path / "b")
    trainer_b, _ = _final_state(interrupted)
    trainer_b.add_event_handler(*_kill_at(7))  # mid-epoch, between two periodic checkpoints
    with pytest.raises(Exception) as killed:
        interrupted.run()
    assert "_Killed: stopped at iteration 7" in error_chain(killed.value)
    saved = torch.load(tmp_path / "b" / "models" / "checkpoint_latest.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 7

    resumed_record = []
    resumed = _workflow(dataset, tmp_path / "b")
    trainer_c = _record_lr(resumed, resumed_record)
    resumed.run()

    assert [it for it, _ in resumed_record] == [8, 9, 10]
    assert trainer_c.state.iteration == trainer_a.state.iteration == 10
    assert trainer_c.state.epoch == trainer_a.state.epoch == 2
    # same learning rate after every resumed iteration as in the uninterrupted run (non-zero before the end)
    assert [lr for _, lr in resumed_record] == pytest.approx([lr for _, lr in reference[7:]], rel=1e-9)
    assert resumed_record[0][1] > 0


def test_negative_only_cases_train(dataset, tmp_path):
    with open(dataset["datalist"]) as f:
        content = json.load(f)
    for item in content["training"]:
        item["box"], item["label"] = [], []
    negatives = tmp_path / "negatives.json"
    negatives.write_text(json.dumps(content))
    workflow = _workflow({**dataset, "datalist": str(negatives)}, tmp_path / "run", max_epochs=1, epoch_length=3,
                         warmup_iterations=1)
    workflow.run()
    trainer, _ = _final_state(workflow)
    assert trainer.state.iteration == 3
    assert np.isfinite(trainer.state.output["loss"])


def test_bad_input_stops_before_any_training(dataset, tmp_path):
    with open(dataset["datalist"]) as f:
        content = json.load(f)
    bad_image = tmp_path / "nan_case.nii.gz"
    source = nib.load(content["training"][0]["image"] if os.path.isabs(content["training"][0]["image"])
                      else os.path.join(dataset["data_dir"], content["training"][0]["image"]))
    data = np.asarray(source.dataobj, dtype=np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, source.affine), str(bad_image))
    content["training"][1]["image"] = str(bad_image)
    bad_list = tmp_path / "bad.json"
    bad_list.write_text(json.dumps(content))
    workflow = _workflow({**dataset, "datalist": str(bad_list)}, tmp_path / "run")
    started = []
    with pytest.raises(Exception) as error:
        trainer, _ = _final_state(workflow)
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: started.append(1))
        workflow.run()
    message = error_chain(error.value)
    assert "DatalistError" in message and "NaN" in message
    assert str(bad_image) in message and "item 1" in message
    assert not started
    assert not os.path.exists(tmp_path / "run" / "models" / "checkpoint_latest.pt")


@pytest.mark.slow
def test_two_process_gloo_training(dataset, tmp_path):
    run_root = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"]
    run_bundle(BUNDLE, ["configs/train.json", "configs/multi_gpu_train.json", "configs/smoke.json",
                        dataset["plans"]], str(tmp_path / "ddp.log"), launcher=launcher,
               bundle_root=str(run_root), dataset_dir=dataset["data_dir"],
               data_list_file_path=dataset["datalist"], max_epochs=2, epoch_length=3, val_interval=1,
               num_workers=0)
    saved = torch.load(run_root / "models" / "checkpoint_latest.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 6
    assert os.path.exists(run_root / "models" / "model.pt")
    with open(tmp_path / "ddp.log", encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "mAP_IoU_0.10_0.50_0.05_MaxDet_100" in log


def _record_loss(workflow, record):
    trainer, _ = _final_state(workflow)
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: record.append((e.state.iteration, e.state.output["loss"])))
    return trainer


def test_resume_where_a_pass_over_the_data_ended_repeats_the_uninterrupted_run_exactly(dataset, tmp_path):
    # 6 training cases in batches of 4: one pass over the data is 2 iterations, an epoch here 2 passes
    passes = {"epoch_length": 4, "max_epochs": 3}
    reference = []
    uninterrupted = _workflow(dataset, tmp_path / "a", **passes)
    _record_loss(uninterrupted, reference)
    uninterrupted.run()

    interrupted = _workflow(dataset, tmp_path / "b", **passes)
    trainer, _ = _final_state(interrupted)
    trainer.add_event_handler(*_kill_at(6))  # mid-epoch, where the third pass ended
    with pytest.raises(Exception):
        interrupted.run()
    resumed_record = []
    resumed = _workflow(dataset, tmp_path / "b", **passes)
    _record_loss(resumed, resumed_record)
    resumed.run()
    # the random generators (global and the augmentations') continue where they stopped: same patches, same losses
    assert [it for it, _ in resumed_record] == list(range(7, 13))
    assert [loss for _, loss in resumed_record] == [loss for _, loss in reference[6:]]


def test_a_resumed_run_keeps_the_best_model(dataset, tmp_path):
    first = _workflow(dataset, tmp_path / "run", max_epochs=1, val_interval=1)
    first.run()
    best_path = tmp_path / "run" / "models" / "model.pt"
    best_bytes = best_path.read_bytes()
    evaluator = first.parser.get_parsed_content("validate#evaluator")
    best = evaluator.state.best_metric

    resumed = _workflow(dataset, tmp_path / "run", max_epochs=2, val_interval=1)
    evaluator = resumed.parser.get_parsed_content("validate#evaluator")
    network = resumed.parser.get_parsed_content("network")

    def ruin(_):  # the second validation sees a network that finds nothing: it must not become model.pt
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.zero_()
    evaluator.add_event_handler(Events.STARTED, ruin)
    resumed.run()
    assert evaluator.state.best_metric == best and evaluator.state.best_metric_epoch == 1
    assert best_path.read_bytes() == best_bytes


def test_unreadable_latest_checkpoint_falls_back_or_names_the_file(dataset, tmp_path):
    run = _workflow(dataset, tmp_path / "run", max_epochs=1)  # saves at iterations 3 and 5
    run.run()
    models = tmp_path / "run" / "models"
    assert (models / "checkpoint_previous.pt").exists()
    (models / "checkpoint_latest.pt").write_bytes(b"not a checkpoint")
    resumed = _workflow(dataset, tmp_path / "run", max_epochs=2)
    trainer, _ = _final_state(resumed)
    resumed.run()  # from the previous checkpoint (iteration 3), with a warning
    assert trainer.state.iteration == 10

    (models / "checkpoint_latest.pt").write_bytes(b"not a checkpoint")
    (models / "checkpoint_previous.pt").write_bytes(b"neither")
    broken = _workflow(dataset, tmp_path / "run", max_epochs=3)
    with pytest.raises(Exception) as error:
        broken.run()
    message = error_chain(error.value)
    assert str(models / "checkpoint_latest.pt") in message and "Rename or delete it" in message
