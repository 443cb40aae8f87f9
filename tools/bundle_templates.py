"""Bundle file templates: one function per file, each a plain function of a variant-table row.

Config conventions (DESIGN §7): every size a user or the smoke preset changes is a TOP-LEVEL key referenced
with `@key`, so that one override file (`configs/smoke.json`, a planning output) merges over train.json,
evaluate.json and inference.json alike. Components come from `meddet` by full dotted path.
"""

from __future__ import annotations

import meddet
from variants import (
    FAMILIES,
    HF,
    INITIALISATIONS,
    MEASURED_SPEED,
    PAPER,
    SMOKE_CHECKPOINT_SOURCE,
    recipe_differences,
)

MEDDET_REQUIREMENT = meddet.__version__
MONAI_VERSION = "1.6.1"
PYTORCH_VERSION = "2.14.1"
NUMPY_VERSION = "2.3.5"

IMPORTS = [
    "$import os",
    "$import json",
    "$import torch",
    "$import monai",
    "$import ignite",
    "$import meddet",
    "$import meddet.data",
    "$import meddet.data.transforms",
    "$import meddet.engines",
    "$import meddet.engines.freeze",
    "$import meddet.metrics",
    "$import meddet.networks",
    "$import meddet.pretrained",
]

# a literal version: MONAI parses `$` expressions as Python before substituting `@` references here
VERSION_CHECK = f"$__import__('meddet').require_version('{MEDDET_REQUIREMENT}')"

# Defaults planned by `python tools/plan.py` on the `realistic` synthetic preset (generic CT lesions):
# re-plan on your own training datalist and pass the written file as an extra config.
GENERIC_PLAN_INTENSITY = {
    "intensity_clip": [-1000.0, 500.0],
    "intensity_mean": -450.0,
    "intensity_std": 420.0,
}
PATCH_SIZE = (128, 128, 128)  # the release's training patch and inference window
TRAIN_BATCH_SIZE = 4
GENERIC_PLAN = {"spacing": [0.8, 0.8, 2.0], **GENERIC_PLAN_INTENSITY}
GENERIC_PLAN_ANCHORS = {
    "anchor_shapes": [[w, h, d] for w in (4, 8, 14) for h in (4, 8, 14) for d in (2, 4, 6)],
}


def family(variant: dict) -> dict:
    return FAMILIES[variant["family"]]


def pretraining(variant: dict) -> dict | None:
    return INITIALISATIONS[variant["initialisation"]]


def is_detr(variant: dict) -> bool:
    return family(variant)["detector"] == "defdetr"


def title(variant: dict) -> str:
    spec = pretraining(variant)
    return f"{family(variant)['title']}, " + (f"{spec['method']} pre-trained encoder" if spec
                                               else "trained from scratch")


def network_def(variant: dict) -> dict:
    spec = family(variant)
    config = {
        "_target_": spec["network_factory"],
        "in_channels": "@in_channels",
        "num_classes": "@num_classes",
        "features_per_stage": "@encoder_features",
        "strides": "@encoder_strides",
    }
    if "encoder_blocks" in spec["network"]:
        config["blocks_per_stage"] = "@encoder_blocks"
    if is_detr(variant):
        config.update({"num_queries": "@num_queries", "detection_levels": "@detection_levels", "d_model": "@d_model",
                       "num_encoder_layers": "@num_encoder_layers", "num_decoder_layers": "@num_decoder_layers",
                       "num_heads": "@num_heads", "num_points": "@num_points", "dim_feedforward": "@dim_feedforward"})
    else:
        config.update({"num_anchors": "@num_anchors", "detection_levels": "@detection_levels",
                       "fpn_channels": "@fpn_channels", "head_convs": "@head_convs"})
    return config


def detector_keys(variant: dict) -> dict:
    """Detector-specific top-level keys: the anchors or queries and the detector component."""
    if is_detr(variant):
        return {
            # max(12, 3 x 95th percentile of objects per training patch): planned by tools/plan.py
            "num_queries": 12,
            "d_model": 128,
            "num_heads": 8,
            "num_points": 4,
            "num_encoder_layers": 3,
            "num_decoder_layers": 6,
            "dim_feedforward": 1024,
            "detector": {
                "_target_": "meddet.detectors.DeformableDETRDetector",
                "network": "@network",
                "num_classes": "@num_classes",
                "detections_per_patch": "$max(@num_queries, 1)",
                "score_thresh": "@score_thresh",
                "inferer": "@inferer",
            },
        }
    return {
        **{key: GENERIC_PLAN_ANCHORS[key] for key in ("anchor_shapes",)},
        "num_anchors": "$len(@anchor_shapes)",
        "fpn_channels": 128,
        "head_convs": 2,
        "detector": {
            "_target_": "meddet.detectors.RetinaUNetDetector",
            "network": "@network",
            "anchor_shapes": "@anchor_shapes",
            "num_classes": "@num_classes",
            "score_thresh": "@score_thresh",
            "inferer": "@inferer",
        },
    }


# where a bundle reads and writes, and on what device: the same keys in every bundle of the collection
WORKFLOW_KEYS = {
    "bundle_root": ".",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "amp": "$torch.cuda.is_available()",
    "dataset_dir": "/workspace/data",
    "data_list_file_path": "$@dataset_dir + '/datalist.json'",
    "output_dir": "$@bundle_root + '/eval'",
    "ckpt_dir": "$@bundle_root + '/models'",
}


def common_keys(variant: dict) -> dict:
    """Top-level keys shared by train.json and inference.json: paths, data geometry, network, detector."""
    network = family(variant)["network"]
    keys = {
        "imports": IMPORTS,
        **WORKFLOW_KEYS,
        "num_classes": 1,
        "class_names": ["lesion"],
        "in_channels": 1,
        "affine_lps_to_ras": False,
        **GENERIC_PLAN,
        "patch_size": list(PATCH_SIZE),
        "encoder_features": network["encoder_features"],
        "encoder_strides": network["encoder_strides"],
        **({"encoder_blocks": network["encoder_blocks"]} if "encoder_blocks" in network else {}),
        "detection_levels": network["detection_levels"],
        "sw_overlap": 0.5,
        "sw_batch_size": 1,
        "tta_mirror_axes": [0, 1, 2],
        "score_thresh": 0.05,
        "detections_per_image": 100,
        "network_def": network_def(variant),
        "network": "$@network_def.to(@device)",
        "inferer": {
            "_target_": "meddet.inference.SlidingWindowBoxInferer",
            "roi_size": "@patch_size",
            "overlap": "@sw_overlap",
            "sw_batch_size": "@sw_batch_size",
            "mirror_axes": "@tta_mirror_axes",
            "score_thresh": "@score_thresh",
            "detections_per_image": "@detections_per_image",
            "pad_value": "$(@intensity_clip[0] - @intensity_mean) / @intensity_std",
        },
    }
    if not is_detr(variant):  # fully convolutional: short axes get a tile of their own length, not a padded one
        keys["inferer"]["size_divisible"] = "$meddet.networks.total_stride(@encoder_strides)"
    keys.update(detector_keys(variant))
    keys.update({
        "detector_ops": [],
        # boxes scoring below it are dropped from the outputs (0 keeps all; evaluation needs all)
        "display_score_thresh": 0.0,
        "postprocessing": {
            "_target_": "meddet.data.transforms.postprocessing",
            "affine_lps_to_ras": "@affine_lps_to_ras",
            "score_thresh": "@display_score_thresh",
        },
        # flat-tuple view of the network for `monai.bundle ckpt_export` / `onnx_export` (see docs/README.md)
        "export_network_def": {"_target_": "meddet.networks.export.TupleOutputNetwork", "network": "@network_def"},
    })
    return keys


def _intensity_args() -> dict:
    return {
        "spacing": "@spacing",
        "intensity_clip": "@intensity_clip",
        "intensity_mean": "@intensity_mean",
        "intensity_std": "@intensity_std",
    }


def _datalist(key: str) -> str:
    return (f"$meddet.data.load_datalist(@data_list_file_path, @dataset_dir, '{key}', "
            "num_classes=@num_classes)")


def _evaluator(handlers: str) -> dict:
    return {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@validate#dataloader",
        "network": "@detector",
        "iteration_update": "$meddet.engines.detection_eval_step",
        "key_val_metric": "@validate#key_metric",
        "additional_metrics": "@validate#additional_metrics",
        "val_handlers": handlers,
        "amp": "@amp",
        "decollate": False,
    }


def _metric(key: str) -> dict:
    return {"_target_": "meddet.metrics.DetectionMAP", "metric_key": key,
            "class_names": "@class_names"}


def recipe(variant: dict) -> dict:
    """Fine-tuning recipes of the release (DESIGN §4)."""
    pretrained = pretraining(variant) is not None
    if is_detr(variant):
        return {
            "learning_rate": 3e-4,
            "weight_decay": 1e-4,
            "max_epochs": 100,
            "epoch_length": 2500,
            "warmup_iterations": 10000 if pretrained else 0,
            # Deformable DETR's usual max-norm 0.1: attention offsets and box refinements otherwise spike early
            "clip_grad_norm": 0.1,
            "val_interval": 5,
            "checkpoint_interval": 500,
            "optimizer": {
                "_target_": "torch.optim.AdamW",
                "params": "$meddet.engines.parameter_groups(@network, @weight_decay)",
                "lr": "@learning_rate",
                "eps": 1e-4,
                "amsgrad": True,
            },
        }
    return {
        "learning_rate": 0.01,
        "momentum": 0.9,
        "weight_decay": 3e-5,
        "max_epochs": 50,
        "epoch_length": 2500,
        "warmup_iterations": 4000,
        "clip_grad_norm": 0.0,
        "val_interval": 5,
        "checkpoint_interval": 500,
        "optimizer": {
            "_target_": "torch.optim.SGD",
            "params": "$meddet.engines.parameter_groups(@network, @weight_decay)",
            "lr": "@learning_rate",
            "momentum": "@momentum",
            "nesterov": True,
        },
    }


def pretrained_keys(variant: dict) -> dict:
    spec = pretraining(variant)
    return {
        # a pre-trained variant never trains from scratch silently: a missing file stops `initialize`
        "pretrained_checkpoint": "$@bundle_root + '/models/checkpoint_final.pth'" if spec else "",
        "pretrained_url": HF.format(repo=spec["repo"]) if spec else "",
        "pretrained_stem": None,
        # what a missing checkpoint's error says instead of the download command (the smoke preset sets it)
        "pretrained_missing_hint": "",
        # > 0: the encoder stays frozen for that many iterations (ablation; the release fine-tunes everything)
        "freeze_encoder_iterations": 0,
    }


# resumable checkpoint of every training bundle (model, optimizer, schedule and the trainer's counters)
def latest_checkpoint(**extra_objects) -> dict:
    """The resumable checkpoint of every training bundle: model, optimizer, schedule, the random generators of the
    run and its training transforms, plus `extra_objects`."""
    return {"_target_": "meddet.engines.LatestCheckpoint", "ckpt_dir": "@ckpt_dir",
            "interval": "@checkpoint_interval",
            "objects": {"model": "@network", "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler",
                        "random_states": {"_target_": "meddet.engines.RandomStates",
                                          "transforms": "@train#preprocessing"},
                        **extra_objects}}
# loss logging of every training bundle, rank 0 only under multi_gpu_train.json
TRAIN_LOGGING_HANDLERS = [
    {"_target_": "StatsHandler", "tag_name": "train_loss",
     "output_transform": "$lambda output: output['loss']", "iteration_log": False},
    {"_target_": "TensorBoardStatsHandler", "log_dir": "$@output_dir + '/tensorboard'",
     "tag_name": "train_loss", "output_transform": "$lambda output: output['loss']"},
    {"_target_": "ignite.handlers.ProgressBar", "persist": False},
]

PRETRAINED_INIT = ("$meddet.pretrained.initialize_from_pretrained(@network_def, @pretrained_checkpoint, "
                   "in_channels=@in_channels, stem=@pretrained_stem, fetch_hint=@pretrained_url, "
                   "missing_hint=@pretrained_missing_hint)")


def train_config(variant: dict) -> dict:
    config = common_keys(variant)
    config.update({
        "seed": 0,
        "batch_size": TRAIN_BATCH_SIZE,
        "num_samples": 1,
        "foreground_ratio": 0.5,
        "augment": True,
        "num_workers": 4,
        "cache_rate": 1.0,
        # "" keeps preprocessed volumes in RAM; a folder keeps them on disk, memory-mapped (meddet.data.cache)
        "cache_dir": "",
        **recipe(variant),
        **pretrained_keys(variant),
        "lr_scheduler": {
            "_target_": "meddet.engines.warmup_poly_scheduler",
            "optimizer": "@optimizer",
            "total_iterations": "$@max_epochs * @epoch_length",
            "warmup_iterations": "@warmup_iterations",
            "warmup_start_lr": 1e-6,
            "exponent": 0.9,
        },
        "train": {
            "preprocessing": {
                "_target_": "meddet.data.transforms.training_transforms",
                "patch_size": "@patch_size",
                **_intensity_args(),
                "affine_lps_to_ras": "@affine_lps_to_ras",
                "num_samples": "@num_samples",
                "foreground_ratio": "@foreground_ratio",
                "augment": "@augment",
            },
            "dataset": {
                "_target_": "meddet.data.cache.cached_dataset",
                "data": _datalist("training"),
                "transform": "@train#preprocessing",
                "cache_rate": "@cache_rate",
                "cache_dir": "@cache_dir",
                "num_workers": "@num_workers",
            },
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@train#dataset",
                "batch_size": "@batch_size",
                "shuffle": True,
                "num_workers": "@num_workers",
                "collate_fn": "$monai.data.utils.no_collation",
            },
            # multi_gpu_train.json attaches the logging handlers on rank 0 only (handlers_for_this_rank)
            "handlers": [
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": False,
                 "epoch_level": False},
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval"},
                {"_target_": "meddet.engines.freeze.FreezeEncoder", "network": "@network",
                 "unfreeze_iteration": "@freeze_encoder_iterations"},
                latest_checkpoint(best_model={"_target_": "meddet.engines.BestModelMemory",
                                              "evaluator": "@validate#evaluator",
                                              "saver": "@validate#best_model_saver"}),
                *TRAIN_LOGGING_HANDLERS,
            ],
            "trainer": {
                "_target_": "SupervisedTrainer",
                "device": "@device",
                "max_epochs": "@max_epochs",
                "epoch_length": "@epoch_length",
                "train_data_loader": "@train#dataloader",
                "network": "@detector",
                "optimizer": "@optimizer",
                "loss_function": "$None",
                "iteration_update": {"_target_": "meddet.engines.DetectionTrainStep",
                                     "clip_grad_norm": "@clip_grad_norm"},
                "train_handlers": "@train#handlers",
                "amp": "@amp",
                "decollate": False,
            },
        },
        "validate": {
            "preprocessing": {
                "_target_": "meddet.data.transforms.validation_transforms",
                **_intensity_args(),
                "affine_lps_to_ras": "@affine_lps_to_ras",
            },
            "dataset": {
                "_target_": "meddet.data.cache.cached_dataset",
                "data": _datalist("validation"),
                "transform": "@validate#preprocessing",
                "cache_rate": "@cache_rate",
                "cache_dir": "@cache_dir",
                "num_workers": "@num_workers",
            },
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@validate#dataset",
                "batch_size": 1,
                "shuffle": False,
                "num_workers": "@num_workers",
                "collate_fn": "$monai.data.utils.no_collation",
            },
            "best_model_saver": {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir",
                                 "save_dict": {"model": "@network"}, "save_key_metric": True,
                                 "key_metric_filename": "model.pt"},
            "handlers": [
                "@validate#best_model_saver",
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "$@output_dir + '/tensorboard'",
                 "iteration_log": False},
            ],
            "key_metric": {"mAP_IoU_0.10_0.50_0.05_MaxDet_100": _metric("mAP_IoU_0.10_0.50_0.05_MaxDet_100")},
            "additional_metrics": {"AP_IoU_0.10_MaxDet_100": _metric("AP_IoU_0.10_MaxDet_100")},
            "evaluator": _evaluator("@validate#handlers"),
        },
        "initialize": [VERSION_CHECK, "$monai.utils.set_determinism(seed=@seed)", PRETRAINED_INIT],
        "run": ["$@train#trainer.run()"],
        "finalize": [],
    })
    return config


def evaluate_config(variant: dict) -> dict:
    """Merged over train.json: score the best checkpoint on the validation split."""
    return {
        "froc_criterion": "iou",
        "save_png": True,
        "validate#handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@ckpt_dir + '/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "meddet.engines.PredictionWriter", "output_dir": "@output_dir",
             "postprocessing": "@postprocessing", "save_png": "@save_png"},
            {"_target_": "meddet.engines.EvaluationReport",
             "prediction_file": "$@output_dir + '/predictions.json'",
             "data_list_file_path": "@data_list_file_path", "dataset_dir": "@dataset_dir",
             "output_dir": "@output_dir", "data_list_key": "validation", "class_names": "@class_names",
             "froc_criterion": "@froc_criterion"},
        ],
        "initialize": [VERSION_CHECK, "$monai.utils.set_determinism(seed=0)"],
        "run": ["$@validate#evaluator.run()"],
        "finalize": [],
    }


def inference_config(variant: dict) -> dict:
    config = common_keys(variant)
    config.update({
        # MONAI Label lists `displayable_configs` in its options panel and drops scores: the viewer's threshold
        "displayable_configs": {"display_score_thresh": 0.0},
        "display_score_thresh": "@displayable_configs#display_score_thresh",
        "data_list_key": "validation",
        "save_png": False,
        "num_workers": 2,
        "preprocessing": {"_target_": "meddet.data.transforms.inference_transforms", **_intensity_args(),
                          "affine_lps_to_ras": "@affine_lps_to_ras"},
        "dataset": {
            "_target_": "Dataset",
            "data": "$meddet.data.load_datalist(@data_list_file_path, @dataset_dir, @data_list_key, "
                    "num_classes=@num_classes)",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": "@num_workers",
            "collate_fn": "$monai.data.utils.no_collation",
        },
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@ckpt_dir + '/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "meddet.engines.PredictionWriter", "output_dir": "@output_dir",
             "postprocessing": "@postprocessing", "save_png": "@save_png"},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@detector",
            "iteration_update": "$meddet.engines.detection_eval_step",
            "val_handlers": "@handlers",
            "amp": "@amp",
            "decollate": False,
        },
        "initialize": [VERSION_CHECK],
        "run": ["$@evaluator.run()"],
        "finalize": [],
    })
    return config


DISTRIBUTED_INIT = [
    VERSION_CHECK,
    "$import torch.distributed as dist",
    "$dist.is_initialized() or dist.init_process_group(backend=@dist_backend)",
    "$monai.utils.set_determinism(seed=@seed)",
]
DISTRIBUTED_END = {
    "run": ["$@train#trainer.run()"],
    "finalize": ["$torch.distributed.is_initialized() and torch.distributed.destroy_process_group()"],
}


def distributed_training_keys() -> dict:
    """multi_gpu_train.json entries every training bundle shares: the rank's device, the backend (gloo on CPU, nccl
    on GPUs), the DDP-wrapped network and the training data sharded across ranks."""
    return {
        "device": "$torch.device(('cuda:' + os.environ['LOCAL_RANK']) if torch.cuda.is_available() else 'cpu')",
        "dist_backend": "$'nccl' if torch.cuda.is_available() else 'gloo'",
        "network": {
            "_target_": "torch.nn.parallel.DistributedDataParallel",
            "module": "$@network_def.to(@device)",
            "device_ids": "$[@device] if torch.cuda.is_available() else None",
        },
        "train#sampler": {"_target_": "DistributedSampler", "dataset": "@train#dataset", "even_divisible": True,
                          "shuffle": True},
        "train#dataloader#sampler": "@train#sampler",
        "train#dataloader#shuffle": False,
    }


def multi_gpu_config(variant: dict) -> dict:
    """Merged over train.json; launched with torchrun. gloo on CPU (tests), nccl on GPUs."""
    return {
        **distributed_training_keys(),
        "train#trainer#train_handlers": "$meddet.engines.handlers_for_this_rank(@train#handlers)",
        "validate#sampler": {"_target_": "DistributedSampler", "dataset": "@validate#dataset",
                             "even_divisible": False, "shuffle": False},
        "validate#dataloader#sampler": "@validate#sampler",
        "validate#evaluator#val_handlers": "$meddet.engines.handlers_for_this_rank(@validate#handlers)",
        "initialize": [*DISTRIBUTED_INIT, PRETRAINED_INIT],
        **DISTRIBUTED_END,
    }


def smoke_checkpoint_hint(variant: dict) -> str:
    """How to get the small checkpoint a pre-trained bundle's smoke preset starts from."""
    source = SMOKE_CHECKPOINT_SOURCE.get(variant["initialisation"])
    if source is None:
        return ("the smoke preset starts from a smoke-size checkpoint in the native MultiTalent layout of the smoke "
                "encoder (features 8-16-32-32), which the collection cannot pre-train (MultiTalent is supervised "
                "multi-dataset segmentation); pass one with --pretrained_checkpoint PATH")
    return (f"the smoke preset starts from a smoke-size checkpoint: pre-train one with the smoke preset of "
            f"bundles/resencl_{source}_pretraining (python -m monai.bundle run --config_file "
            "\"['configs/train.json','configs/smoke.json']\" --dataset_dir D --data_list_file_path L --bundle_root R) "
            "and pass --pretrained_checkpoint R/models/checkpoint_final.pth; any nnssl-format checkpoint of the smoke "
            "encoder works")


def smoke_config(variant: dict) -> dict:
    """Tiny CPU preset: merges over train.json, evaluate.json and inference.json (top-level keys only). A pre-trained
    variant keeps its `pretrained_checkpoint` (a small one, see `smoke_checkpoint_hint`): it never trains from
    scratch, not even in smoke."""
    smoke = dict(family(variant)["smoke"])
    if pretraining(variant) is not None:
        del smoke["pretrained_checkpoint"]
        smoke["pretrained_missing_hint"] = smoke_checkpoint_hint(variant)
    return smoke


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=logging.StreamHandler
level=INFO
formatter=fullFormatter
args=()

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

APACHE_NOTICE = """Copyright (c) {year} the meddet authors

Licensed under the Apache License, Version 2.0 (the "License");
you may not use this bundle except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.
{weights_note}"""


PARAMETER_COUNTS = {
    # measured with one class (27 anchors / 12 queries) by the network tests; encoder counts in brackets
    "retinaunet_resencl": "95.13 M (encoder 90.30 M)",
    "retinaunet_nndet": "18.86 M (encoder 14.02 M)",
    "defdetr_resencl": "94.45 M (encoder 90.30 M)",
}


def _pretraining_metadata(variant: dict) -> dict | None:
    spec = pretraining(variant)
    if spec is None:
        return None
    return {"method": spec["method"], "kind": spec["kind"], "data": spec["data"],
            "source": HF.format(repo=spec["repo"]), "repository": f"MIC-DKFZ/{spec['repo']}",
            "license": "CC-BY-4.0", "citation": spec["citation"]}


def metadata(variant: dict) -> dict:
    spec = pretraining(variant)
    references = [PAPER]
    if is_detr(variant):
        references.append("Zhu et al., Deformable DETR: Deformable Transformers for End-to-End Object Detection, "
                          "ICLR 2021")
    else:
        references += [
            "Baumgartner et al., nnDetection: A Self-configuring Method for Medical Object Detection, MICCAI 2021",
            "Jaeger et al., Retina U-Net: Embarrassingly Simple Exploitation of Segmentation Supervision for "
            "Medical Object Detection, ML4H 2020",
        ]
    if spec:
        references.append(spec["citation"])
    return {
        **metadata_common(variant),
        "name": title(variant),
        "task": "3D lesion detection in CT",
        "description": (f"{title(variant)}: a 3D object detector returning boxes, labels and scores for lesions in "
                        "a volume, fine-tunable on your own datalist."),
        "data_source": "your own detection datalist (MONAI detection format); synthetic data for the smoke preset",
        "image_classes": "single-channel CT in Hounsfield units",
        "label_classes": "0: lesion (boxes world mm cccwhd, 0-based labels)",
        "pred_classes": "0: lesion",
        "references": references,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": [128, 128, 128],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "object",
                    "format": "cccwhd",
                    "dtype": "float32",
                    "num_channels": 1,
                    "spatial_shape": [],
                    "value_range": [],
                    "channel_def": {"0": "lesion"},
                }
            },
        },
        "meddet": {
            "kind": "detection",
            "family": variant["family"],
            "detector": family(variant)["detector"],
            "initialisation": variant["initialisation"],
            "pretraining": _pretraining_metadata(variant),
            "parameters": PARAMETER_COUNTS[variant["family"]],
        },
    }


def metadata_common(variant: dict) -> dict:
    """Metadata entries every bundle of the collection shares (versions, packages, authorship, intended use)."""
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": variant["version"],
        "changelog": dict(sorted(variant["changelog"].items(), key=lambda kv: meddet.version_key(kv[0]), reverse=True)),
        "monai_version": MONAI_VERSION,
        "pytorch_version": PYTORCH_VERSION,
        "numpy_version": NUMPY_VERSION,
        "required_packages_version": {
            "meddet": MEDDET_REQUIREMENT,
            "nibabel": "5.4.2",
            "itk": "5.4.7",
            "pytorch-ignite": "0.5.5",
            "dynamic-network-architectures": "0.4.4",
            "scipy": "1.17.1",
            "tensorboard": "2.21.0",
            "matplotlib": "3.11.2",
        },
        "supported_apps": {},
        "authors": "meddet contributors",
        "copyright": "Copyright (c) meddet contributors",
        "data_type": "nibabel",
        "eval_metrics": {},
        "intended_use": "This is an example, not to be used for diagnostic purposes",
    }


def _number(value: float) -> str:
    """A recipe number as the paper writes it: 0.01, 3e-5, 10,000."""
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:g}"


def _recipe_text(variant: dict) -> str:
    """The recipe as prose, its numbers read from `recipe()` (the values the configs are rendered with)."""
    r = recipe(variant)
    optimizer = r["optimizer"]
    schedule = (f"{_number(r['max_epochs'])} epochs x {_number(r['epoch_length'])} iterations, "
                f"batch {TRAIN_BATCH_SIZE}, {PATCH_SIZE[0]}^3 patches")
    warmup = (f"{_number(r['warmup_iterations'])} linear warm-up iterations from 1e-6, then"
              if r["warmup_iterations"] else "no warm-up;")
    if is_detr(variant):
        return (f"AdamW (amsgrad, eps {_number(optimizer['eps'])}), lr {_number(r['learning_rate'])}, weight decay "
                f"{_number(r['weight_decay'])}, {warmup} poly 0.9 per iteration, {schedule}, gradient norm clipped at "
                f"{_number(r['clip_grad_norm'])}, AMP on CUDA. Hungarian matching (class 2, L1 5, GIoU 2); focal "
                "(gamma 1, alpha 0.75), L1 x5, GIoU x2 with auxiliary losses on every decoder layer and the encoder "
                "proposals. Top-K per patch, no NMS, then sliding-window stitching, mirror TTA and weighted box "
                "clustering.")
    return (f"SGD Nesterov (momentum {_number(r['momentum'])}), lr {_number(r['learning_rate'])}, weight decay "
            f"{_number(r['weight_decay'])} (none on norms and biases), {warmup} poly 0.9 per iteration, {schedule}, "
            "AMP on CUDA. ATSS matching (4 candidates), focal classification (gamma 1, alpha 0.75), smooth-L1 box "
            "regression, 0.5 CE + 0.5 Dice segmentation; sliding-window stitching, mirror TTA and weighted box "
            "clustering.")


def _differences_text(variant: dict) -> str:
    return "\n".join(f"- {difference}: {reason}." for difference, reason in recipe_differences(variant))


def _pretraining_text(variant: dict) -> str:
    spec = pretraining(variant)
    if spec is None:
        return ("All weights start from random initialisation (`pretrained_checkpoint` is empty). The paper finds "
                "reconstruction-pre-trained encoders (the `mae` and `s3d` bundles) better than this baseline.\n")
    url = HF.format(repo=spec["repo"])
    stem = ("\nThe checkpoint holds one stem per pre-training dataset; the CT stem is used by default, another "
            "is chosen with `--pretrained_stem <id>`.\n" if variant["initialisation"].startswith("multitalent") else "")
    return f"""The encoder (stem + stages) starts from the released **{spec['method']}** checkpoint
([MIC-DKFZ/{spec['repo']}](https://huggingface.co/MIC-DKFZ/{spec['repo']})): {spec['kind']}, pre-trained on
{spec['data']}. The decoder/FPN, transformer and heads start from random initialisation; everything is fine-tuned
(no freezing; `freeze_encoder_iterations` > 0 freezes the encoder for that many iterations as an ablation).
{stem}
Fetch the weights once (about 400 MB, CC-BY-4.0 per the model card) into `models/checkpoint_final.pth`:

    python -m monai.bundle download_large_files --bundle_path .

or download {url} there yourself. Training stops with this instruction if the file is missing; a pre-trained
bundle never trains from scratch silently. Another location: `--pretrained_checkpoint PATH`.
"""


def _smoke_note(variant: dict) -> str:
    if pretraining(variant) is None:
        return ""
    source = SMOKE_CHECKPOINT_SOURCE.get(variant["initialisation"])
    if source is None:
        return (" The smoke preset does not train from scratch either: it needs a smoke-size checkpoint in the "
                "native MultiTalent layout (`--pretrained_checkpoint PATH`), which the collection cannot pre-train.")
    return f"""
The smoke preset does not train from scratch either: it starts from a smoke-size checkpoint of the smoke encoder,
made by the smoke preset of `bundles/resencl_{source}_pretraining` and passed with `--pretrained_checkpoint PATH`
(`python tools/quickstart.py --init mae` does both steps)."""


def _speed_text(variant: dict) -> str:
    speed = MEASURED_SPEED
    lines = [
        f"- Training input: the box-aware crop draws each patch centre from the boxes (MONAI's positive/negative "
        f"distribution, without MONAI's whole-volume mask per patch). One loader worker on {speed['machine']} gives "
        f"{speed['loader_patches_per_s']:.1f} patches/s of 128^3 with every augmentation from a 450x450x190 CT "
        f"({speed['loader_monai_crop_patches_per_s']:.2f} with MONAI's `RandCropBoxByPosNegLabeld`).",
        f"- Preprocessed volumes wait in RAM (`cache_rate`). `--cache_dir DIR` keeps them on disk instead, "
        f"memory-mapped, for datasets larger than RAM (888 LUNA16 CTs of ~38 M voxels: ~135 GB as float32): "
        f"{speed['loader_disk_cache_patches_per_s']:.1f} patches/s per worker from a warm page cache. Entries are "
        "keyed by the preprocessing settings and the source files' size and time.",
    ]
    if is_detr(variant):
        lines.append("- Inference: windows of the training patch (the token grid is fixed by it), overlap "
                     "`sw_overlap`.")
    else:
        lines.append(
            "- Inference: the segmentation branch is skipped (it only trains the network); an axis shorter than the "
            "128-voxel window gets a tile of its own length rounded up to 32 instead of a padded window. Per volume "
            f"({speed['zoo_volume']}, no TTA, {speed['machine']}): {speed['inference_vs_zoo_ratio']:.2f}x the time "
            f"of the model zoo's RetinaNet (`lung_nodule_ct_detection`, whole volume in one pass), "
            f"{speed['inference_vs_zoo_ratio_before']:.2f}x before these two changes; on a volume that fits one "
            f"window (128x128x64) {speed['one_window_vs_zoo_ratio']:.2f}x. The rest is tile overlap (`sw_overlap` "
            "0.5: a 437x437x175 CT takes 72 windows, 50 at 0.25). Fewer or larger windows were measured and "
            f"rejected: on the synthetic benchmark the smoke model's AP@0.1 ({speed['whole_volume_ap'][0]:.3f} with "
            f"patch-size windows at overlap 0.5) fell to {speed['overlap_025_ap']:.3f} at overlap 0.25, to "
            f"{speed['grown_window_ap']:.3f} with windows stretched to cover axes up to 1.25x the patch, and to "
            f"{speed['whole_volume_ap'][1]:.3f} with whole-volume windows: a network trained on patches finds more "
            "false positives in windows larger than them (its instance normalisation sees other statistics).")
    lines.append(
        f"- Mirror TTA (`tta_mirror_axes`, default `[0, 1, 2]`) runs 8 passes per window: {speed['tta_cost']:.1f}x "
        "the time per volume of `--tta_mirror_axes \"[]\"`.")
    return "\n".join(lines)


def readme(variant: dict) -> str:
    name = variant["name"]
    export_note = ("last-layer `pred_logits`, `pred_boxes`; trace at the training patch size, the token grid is "
                   "fixed by it" if is_detr(variant) else
                   "classification maps, then box-regression maps (no segmentation: it is skipped at inference); any "
                   "multiple of 32 per axis with "
                   "at least one axis of 64 works (the smoke preset: multiples of 8, one axis of 16)")
    spec = pretraining(variant)
    citation = f"\n- {spec['citation']}." if spec else ""
    weights_licence = (f" The pre-trained weights ({spec['repo']}) are licensed CC-BY-4.0 by their authors."
                       if spec else "")
    planning = ("`num_queries` (max(12, 3 x the 95th percentile of objects per training patch))" if is_detr(variant)
                else "27 anchor shapes")
    return f"""# {title(variant)}

`{name}` is a MONAI Bundle of the meddet collection: {family(variant)['title']}
({PARAMETER_COUNTS[variant['family']]} parameters), fine-tuned with the release's recipe (the differences are listed under
Recipe).

## Initialisation

{_pretraining_text(variant)}
## Requirements

`pip install -e .` in the collection's repository (installs `meddet` and the packages listed in
`configs/metadata.json`).

## Data

A MONAI detection datalist: `{{"training": [{{"image": path, "box": [[cx, cy, cz, w, h, d], ...], "label": [0, ...]}}],
"validation": [...]}}`, boxes in world millimetres (`cccwhd`, RAS: the frame MONAI's readers give every format;
set `affine_lps_to_ras` to true for boxes written in LPS). An image is a `.nii(.gz)`, `.mhd`, `.nrrd` or a
DICOM series folder. Cases without boxes are valid negatives. Optional per item: `ignore_box` (no loss there
in training; detections there count neither way in evaluation) and `diameter_mm` (one per box; evaluation
then also reports the LUNA16 CPM). `python tools/luna16.py datalist` writes such datalists for LUNA16's folds.
The datalist is checked before training: missing or 2D images, NaN/Inf voxels, broken DICOM series or `.mhd`
data files, boxes outside the image or with non-positive size, box/label count mismatches and labels outside
`num_classes` are reported with the file and item.

Plan spacing, CT intensity normalisation and {planning} for your data into an override file (kept outside
this folder; `plans.json` below stands for its path):

    python tools/plan.py --data_list_file_path L --dataset_dir D --output_path P/plans.json

## Recipe

{_recipe_text(variant)}

Where this bundle departs from the paper's released recipe (what differs, and why):

{_differences_text(variant)}

## Commands (run from this folder)

Train; the best validation `mAP_IoU_0.10_0.50_0.05_MaxDet_100` is kept as `models/model.pt`. A killed run resumes
from `models/checkpoint_latest.pt` (the one before it is kept as `checkpoint_previous.pt` and used if the latest
cannot be read) with its optimizer, schedule, best score and random generators: resumed where a pass over the
training data ended, with `num_workers` 0, it repeats the uninterrupted run exactly on CPU; loader workers'
augmentations and the order of a pass interrupted midway are drawn afresh:

    python -m monai.bundle run --config_file "['configs/train.json','plans.json']" --dataset_dir D --data_list_file_path L

Evaluate `models/model.pt` on the validation split; writes `eval/predictions.json`, `eval/metrics.json` (COCO
mAP/AP/AR, FROC, and the LUNA16 CPM with `eval/luna16_froc.png` when the datalist has `diameter_mm`),
`eval/per_case.csv`, `eval/froc.png` and PNGs:

    python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json','plans.json']" --dataset_dir D --data_list_file_path L

Inference (items of `data_list_key`, default `validation`; only `image` is needed):

    python -m monai.bundle run --config_file "['configs/inference.json','plans.json']" --dataset_dir D --data_list_file_path L

Multi-GPU training:

    torchrun --nproc_per_node=2 -m monai.bundle run --config_file "['configs/train.json','configs/multi_gpu_train.json','plans.json']" --dataset_dir D --data_list_file_path L

Add `configs/smoke.json` (before `plans.json`) to any command for a tiny CPU-sized network and schedule
(minutes on 2 cores).{_smoke_note(variant)}

## Outputs

`predictions.json`: one entry per image with `image`, `box` (world mm, `cccwhd`), `label`, `label_scores`.

## Speed and memory

{_speed_text(variant)}

`python tools/benchmark.py` (in the collection's repository) measures these on your machine.

## Export

TorchScript (traced; `export_network_def` returns the network's outputs as a flat tuple, {export_note}):

    python -m monai.bundle ckpt_export --net_id export_network_def --filepath models/model.ts --ckpt_file models/model.pt --config_file configs/inference.json --use_trace True --input_shape "[1,1,128,128,128]"

`onnx_export` takes the same arguments (opset 20; needs the `onnx` package).

## MONAI Label / 3D Slicer

`python tools/monailabel_app.py prepare --app_dir APP --studies IMAGES --bundles {name}` (in the collection's repository)
prepares a MONAI Label 0.8.5 app serving this bundle to 3D Slicer, with the viewer's LPS frame set in the served
copy of `configs/inference.json` and `configs/train.json`, and prints the `monailabel start_server` command; the
collection README walks through detecting, correcting the boxes, training and detecting again. MONAI Label does
not show scores: `display_score_thresh` (in `displayable_configs`, default set by `--score_thresh`) decides which
boxes are sent.

## References

- {PAPER}.{citation}

## License

Code and configuration: Apache-2.0 (see LICENSE).{weights_licence}
"""


def large_files(variant: dict) -> str | None:
    spec = pretraining(variant)
    if spec is None:
        return None
    # no published checksum: the release lists none, and inventing one would make every download fail
    return (f"large_files:\n  - path: \"models/checkpoint_final.pth\"\n    url: \"{HF.format(repo=spec['repo'])}\"\n"
            f"    hash_val: \"\"\n    hash_type: \"\"\n")


def render(variant: dict) -> dict:
    """Relative path -> content (dict/list for JSON, str for text) of every generated file of a bundle."""
    files = {
        "configs/metadata.json": metadata(variant),
        "configs/train.json": train_config(variant),
        "configs/evaluate.json": evaluate_config(variant),
        "configs/inference.json": inference_config(variant),
        "configs/multi_gpu_train.json": multi_gpu_config(variant),
        "configs/smoke.json": smoke_config(variant),
        "configs/logging.conf": LOGGING_CONF,
        "docs/README.md": readme(variant),
        "LICENSE": APACHE_NOTICE.format(year=2026, weights_note=""),
    }
    weights = large_files(variant)
    if weights:
        files["large_files.yml"] = weights
    return files
