"""Detection bundle config templates: one function per config file, each a plain function of a variant-table row
(`bundle_docs` writes the metadata and README, `bundle_files` the files every bundle shares;
`generate_bundles.render_detection` puts them together).

Config conventions (DESIGN §7): every size a user or the smoke preset changes is a TOP-LEVEL key referenced
with `@key`, so that one override file (`configs/smoke.json`, a planning output) merges over train.json,
evaluate.json and inference.json alike. Components come from `meddet` by full dotted path.
"""

from __future__ import annotations

from bundle_files import MEDDET_REQUIREMENT
from variants import (
    FAMILIES,
    HF,
    INITIALISATIONS,
    SMOKE_CHECKPOINT_SOURCE,
)

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
    # The one place where names change between layers, on purpose: the top-level keys say which part they size
    # (`encoder_*`, shared with plans and overrides), the constructors keep dynamic-network-architectures' names,
    # which the released checkpoints' architecture settings use too (`features_per_stage`, `strides`,
    # `blocks_per_stage`); every other key has one name from the JSON down.
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
