"""Templates of the pre-training bundles (`kind: "pretraining"` rows of the variant table).

Same conventions as the detection bundles (`bundle_templates`): every size a user or the smoke preset changes is a
top-level key; components come from `meddet` by full dotted path; `configs/smoke.json` merges over train.json and
evaluate.json alike.
"""

from __future__ import annotations

import bundle_files
import bundle_templates as common
from variants import FAMILIES, PAPER, PRETRAINING_METHODS, PRETRAINING_RECIPE

IMPORTS = [*common.IMPORTS, "$import meddet.pretraining"]
CHECKPOINT = "$@ckpt_dir + '/checkpoint_final.pth'"


def method(variant: dict) -> dict:
    return PRETRAINING_METHODS[variant["initialisation"]]


def is_contrastive(variant: dict) -> bool:
    return "crop_size" in method(variant)["settings"]


def title(variant: dict) -> str:
    return f"{method(variant)['method']} pre-training of a {FAMILIES[variant['family']]['title']}"


def _transforms(variant: dict, train: bool) -> dict:
    config = {
        "_target_": method(variant)["transforms"],
        "patch_size": "@patch_size",
        "spacing": "@spacing",
        "intensity_normalization": "@intensity_normalization",
        "intensity_clip": "@intensity_clip",
        "intensity_mean": "@intensity_mean",
        "intensity_std": "@intensity_std",
        "train": train,
    }
    if is_contrastive(variant):
        config.update({"crop_size": "@crop_size", "min_overlap": "@min_overlap"})
    elif train:
        config["spatial_augmentation"] = "@spatial_augmentation"
    return config


def _dataset(key: str, transforms: str) -> dict:
    return {
        "_target_": "CacheDataset",
        "data": f"$meddet.data.load_datalist(@data_list_file_path, @dataset_dir, '{key}', labels=False)",
        "transform": transforms,
        "cache_rate": "@cache_rate",
        "num_workers": "@num_workers",
    }


def _dataloader(dataset: str, batch_size, shuffle: bool) -> dict:
    return {"_target_": "DataLoader", "dataset": dataset, "batch_size": batch_size, "shuffle": shuffle,
            "num_workers": "@num_workers", "collate_fn": "$monai.data.utils.no_collation", "drop_last": shuffle}


def network_def(variant: dict) -> dict:
    config = {"_target_": method(variant)["network"], "arch_kwargs": "@arch_kwargs", "in_channels": "@in_channels"}
    if is_contrastive(variant):
        config.update({"hidden_dim": "@hidden_dim", "projection_dim": "@projection_dim"})
    return config


def train_config(variant: dict) -> dict:
    spec = method(variant)
    network = FAMILIES[variant["family"]]["network"]
    recipe = PRETRAINING_RECIPE
    return {
        "imports": IMPORTS,
        **common.WORKFLOW_KEYS,
        "in_channels": 1,
        "spacing": recipe["spacing"],
        # "zscore": each image by its own mean/std (nnssl); "ct": clip + z-score with the planned values below,
        # the detectors' scheme (pass the detection plan file to pre-train on exactly their inputs)
        "intensity_normalization": recipe["intensity_normalization"],
        **common.GENERIC_PLAN_INTENSITY,
        **spec["settings"],
        "recommended_downstream_patchsize": recipe["recommended_downstream_patchsize"],
        "encoder_features": network["encoder_features"],
        "encoder_strides": network["encoder_strides"],
        "encoder_blocks": network["encoder_blocks"],
        "arch_kwargs": {"_target_": "meddet.pretraining.resenc_unet_arch_kwargs",
                        "features_per_stage": "@encoder_features", "strides": "@encoder_strides",
                        "blocks_per_stage": "@encoder_blocks",
                        **({"decoder_convs": "@decoder_convs"} if "decoder_convs" in spec["settings"] else {})},
        "network_def": network_def(variant),
        "network": "$@network_def.to(@device)",
        "objective": spec["objective"],
        "seed": 0,
        "batch_size": recipe["batch_size"],
        "num_workers": 4,
        # unlabeled corpora rarely fit in memory: volumes are loaded per patch unless a share is cached
        "cache_rate": 0.0,
        "learning_rate": recipe["learning_rate"],
        "momentum": recipe["momentum"],
        "weight_decay": recipe["weight_decay"],
        "max_epochs": recipe["max_epochs"],
        "epoch_length": recipe["epoch_length"],
        "val_interval": 10,
        "checkpoint_interval": 250,
        "optimizer": {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": "@learning_rate",
                      "momentum": "@momentum", "nesterov": True, "weight_decay": "@weight_decay"},
        "lr_scheduler": {"_target_": "meddet.engines.warmup_poly_scheduler", "optimizer": "@optimizer",
                         "total_iterations": "$@max_epochs * @epoch_length", "warmup_iterations": 0,
                         "exponent": 0.9},
        "train": {
            "preprocessing": _transforms(variant, train=True),
            "dataset": _dataset("training", "@train#preprocessing"),
            "dataloader": _dataloader("@train#dataset", "@batch_size", shuffle=True),
            "handlers": [
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": False,
                 "epoch_level": False},
                common.latest_checkpoint(),
                # both write on rank 0 only
                "@validate#validation",
                "@checkpoint_writer",
            ],
            # logging on rank 0 only (multi_gpu_train.json leaves these out on the other ranks)
            "rank0_handlers": common.TRAIN_LOGGING_HANDLERS,
            "trainer": {
                "_target_": "SupervisedTrainer",
                "device": "@device",
                "max_epochs": "@max_epochs",
                "epoch_length": "@epoch_length",
                "train_data_loader": "@train#dataloader",
                "network": "@network",
                "optimizer": "@optimizer",
                "loss_function": "$None",
                "iteration_update": {"_target_": "meddet.pretraining.PretrainingStep", "objective": "@objective",
                                     "clip_grad_norm": "@clip_grad_norm"},
                "train_handlers": "$@train#handlers + @train#rank0_handlers",
                "amp": "@amp",
                "decollate": False,
            },
        },
        "validate": {
            "preprocessing": _transforms(variant, train=False),
            "dataset": _dataset("validation", "@validate#preprocessing"),
            "dataloader": _dataloader("@validate#dataset", "@batch_size", shuffle=False),
            "validation": {"_target_": "meddet.pretraining.PretrainingValidation", "network": "@network",
                           "objective": "@objective", "data_loader": "@validate#dataloader",
                           "output_dir": "@output_dir", "device": "@device", "interval": "@val_interval",
                           "amp": "@amp"},
        },
        "checkpoint_writer": {
            "_target_": "meddet.pretraining.NnsslCheckpointWriter", "network": "@network", "ckpt_dir": "@ckpt_dir",
            "arch_kwargs": "@arch_kwargs",
            "pretrain_patch_size": "@crop_size" if is_contrastive(variant) else "@patch_size",
            "spacing": "@spacing", "intensity_normalization": "@intensity_normalization",
            "recommended_downstream_patchsize": "@recommended_downstream_patchsize", "method": spec["method"],
        },
        "initialize": [common.VERSION_CHECK, "$monai.utils.set_determinism(seed=@seed)"],
        "run": ["$@train#trainer.run()"],
        "finalize": [],
    }


def evaluate_config(variant: dict) -> dict:
    """Merged over train.json: the validation objective of `models/checkpoint_final.pth` -> eval/metrics.json."""
    return {
        "initialize": [common.VERSION_CHECK, "$monai.utils.set_determinism(seed=@seed)",
                       f"$meddet.pretraining.load_pretraining_weights(@network, {CHECKPOINT[1:]})"],
        "run": ["$@validate#validation.run()"],
        "finalize": [],
    }


def multi_gpu_config(variant: dict) -> dict:
    """Merged over train.json; launched with torchrun. `batch_size` stays the total across ranks (nnssl's BS8)."""
    keys = common.distributed_training_keys()
    if not is_contrastive(variant):
        # without deep supervision the U-Net's lower-resolution output heads take no part in the loss, and they
        # stay in the network so that its state dict is the released ResidualEncoderUNet's
        keys["network"] = {**keys["network"], "find_unused_parameters": True}
    return {
        **keys,
        "train#dataloader#batch_size": "$max(1, @batch_size // torch.distributed.get_world_size())",
        "train#trainer#train_handlers":
            "$@train#handlers + (@train#rank0_handlers if torch.distributed.get_rank() == 0 else [])",
        "initialize": common.DISTRIBUTED_INIT,
        **common.DISTRIBUTED_END,
    }


def smoke_config(variant: dict) -> dict:
    return {**FAMILIES[variant["family"]]["smoke"], **method(variant)["smoke"]}


def metadata(variant: dict) -> dict:
    spec = method(variant)
    output = ({"embedding": {"type": "embedding", "format": "projection", "num_channels": 1, "spatial_shape": [],
                             "dtype": "float32", "value_range": [], "channel_def": {"0": "projection"}}}
              if is_contrastive(variant) else
              {"reconstruction": {"type": "image", "format": "magnitude", "num_channels": 1,
                                  "spatial_shape": spec["settings"]["patch_size"], "dtype": "float32",
                                  "value_range": [], "is_patch_data": True,
                                  "channel_def": {"0": "reconstructed intensity"}}})
    data = bundle_files.metadata_common(variant)
    data.update({
        "name": title(variant),
        "task": "self-supervised pre-training of a 3D encoder",
        "description": (f"{title(variant)} on unlabeled CT/MRI volumes; writes models/checkpoint_final.pth in the "
                        "released nnssl format, the pretrained_checkpoint of the collection's detection bundles."),
        "data_source": "your own unlabeled volumes (a datalist of images); synthetic data for the smoke preset",
        "image_classes": "single-channel 3D image (CT or MRI)",
        "label_classes": "none (self-supervised)",
        "pred_classes": "none",
        "references": [PAPER, spec["citation"]],
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": spec["settings"].get("crop_size", spec["settings"]["patch_size"]),
                                 "dtype": "float32", "value_range": [], "is_patch_data": True,
                                 "channel_def": {"0": "image"}}},
            "outputs": output,
        },
        "meddet": {"kind": "pretraining", "family": variant["family"], "detector": "none",
                   "initialisation": variant["initialisation"], "method": spec["method"],
                   "produces": "models/checkpoint_final.pth (nnssl format)"},
    })
    return data


def _recipe_text(variant: dict) -> str:
    spec, recipe = method(variant), PRETRAINING_RECIPE
    settings = spec["settings"]
    if is_contrastive(variant):
        task = (f"two {'x'.join(map(str, settings['crop_size']))} crops of one "
                f"{'x'.join(map(str, settings['patch_size']))} patch overlapping by at least "
                f"{settings['min_overlap']:.0%}, each augmented on its own (mirroring, brightness, shift, contrast, "
                f"noise, blur); NT-Xent at temperature {settings['temperature']} with cosine similarity; projection "
                f"head on the global average pools of all encoder stages, concatenated, then a 3-layer MLP "
                f"({settings['hidden_dim']} hidden, {settings['projection_dim']} out) with per-sample normalisation")
    else:
        task = (f"{'x'.join(map(str, settings['patch_size']))} patches (rotation up to 30 deg p 0.2, scaling "
                f"0.7-1.4 p 0.2, mirroring), {settings['mask_ratio']:.0%} of the {settings['mask_block_size']}^3 "
                "blocks masked (zeroed), the whole ResEnc U-Net (one decoder conv per stage, one output channel) "
                "reconstructs the patch, MSE on the masked voxels only")
    return (f"{task}. SGD Nesterov, lr {recipe['learning_rate']:g}, momentum {recipe['momentum']}, weight decay "
            f"{recipe['weight_decay']:g}, poly 0.9, {recipe['max_epochs']} epochs x {recipe['epoch_length']} "
            f"iterations, batch {recipe['batch_size']} in total across GPUs, gradient norm clipped at "
            f"{settings['clip_grad_norm']:g}, AMP on CUDA; per-image z-score intensities, "
            f"{'x'.join(f'{s:g}' for s in recipe['spacing'])} mm spacing.")


DIFFERENCES = {
    "common": [
        "The poly schedule steps every iteration instead of every epoch (the learning rates differ by less than "
        "one epoch's decay).",
        "Patches are cropped from volumes loaded and resampled on the fly by MONAI transforms instead of nnssl's "
        "preprocessed blosc2 arrays. `cache_rate` (default 0: corpora rarely fit in memory) keeps that share of "
        "the resampled volumes in memory; raise it as far as memory allows, loading is then done once.",
    ],
    "mae": [
        "Rotation and scaling act on the cropped patch (corners filled with 0, as nnssl fills them) rather than on "
        "a larger region cropped afterwards. The smoke preset leaves them out (`spatial_augmentation` false).",
    ],
    "simclr": [
        "The per-view augmentation is MONAI's (mirroring, brightness, shift, contrast, noise, blur as listed); "
        "nnssl's SimCLR transform draws its own set.",
        "nnssl's projection head normalises with InstanceNorm1d applied to [batch, features]; here the same "
        "per-sample normalisation is written as layer normalisation without affine parameters.",
    ],
}


def readme(variant: dict) -> str:
    spec = method(variant)
    name = variant["name"]
    differences = DIFFERENCES["common"] + DIFFERENCES.get(variant["initialisation"], [])
    consumers = ", ".join(f"`{family}_{init}_detection`" for family in ("retinaunet_resencl", "defdetr_resencl")
                          for init in ("mae",) if variant["initialisation"] == "mae") or \
        "any ResEnc detection bundle (`--pretrained_checkpoint PATH`)"
    return f"""# {title(variant)}

`{name}` is a MONAI Bundle of the meddet collection: {spec['method']} pre-training, {spec['kind']}, of the
detectors' ResEnc-L encoder on your own unlabeled volumes. It writes `models/checkpoint_final.pth` in the released
nnssl format (`network_weights` + `nnssl_adaptation_plan` whose `arch_kwargs` rebuild the exact network), which
{consumers} take unchanged as `pretrained_checkpoint`.

## Data

An unlabeled datalist `{{"training": [{{"image": path}}, ...], "validation": [...]}}` (NIfTI, or anything MONAI's
`LoadImage` reads). Boxes and labels are ignored if present, so a detection datalist works too. Images are checked
before training (missing, unreadable, 2D, NaN/Inf) with the file and item named.

## Recipe (nnssl)

{_recipe_text(variant)}

Where this bundle departs from nnssl:

{chr(10).join(f"- {line}" for line in differences)}

## Commands (run from this folder)

Pre-train (resumes from `models/checkpoint_latest.pt`; writes `models/checkpoint_final.pth` at the end, checked to
re-load into a freshly built encoder; loss curve and validation in `eval/tensorboard`{'' if is_contrastive(variant) else ', reconstructions in `eval/reconstruction/`'}):

    python -m monai.bundle run --config_file configs/train.json --dataset_dir D --data_list_file_path L

Validation objective of the final checkpoint (`eval/metrics.json`):

    python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" --dataset_dir D --data_list_file_path L

Multi-GPU (`batch_size` is the total over all GPUs, as nnssl's BS8):

    torchrun --nproc_per_node=2 -m monai.bundle run --config_file "['configs/train.json','configs/multi_gpu_train.json']" --dataset_dir D --data_list_file_path L

Fine-tune a detector from it:

    cd ../retinaunet_resencl_mae_detection
    python -m monai.bundle run --config_file "['configs/train.json','plans.json']" --pretrained_checkpoint ../{name}/models/checkpoint_final.pth --dataset_dir D --data_list_file_path L2

Add `configs/smoke.json` to any command for the CPU-sized preset: the detectors' smoke encoder (features 8-16-32-32),
about a minute on 2 cores; its checkpoint is what the pre-trained detection bundles' smoke presets start from.
`--intensity_normalization ct` with the detection plan file (`tools/plan.py`) listed after the configs
pre-trains on exactly the intensities the detector will see (the smoke preset does this).

## What it bought on synthetic data

`tools/pretraining_study.py` pre-trains this bundle's smoke preset on an unlabeled synthetic corpus and fine-tunes
the Retina U-Net from scratch / MAE / SimCLR at 4, 8 and 32 labelled volumes; its measured table, plot and command
are in the collection README ("What pre-training buys here"). At that CPU scale (0.11 M-parameter encoder, 1200
pre-training iterations) pre-training did not reliably help; the full-size recipe above is the paper's.

## References

- {PAPER}.
- {spec['citation']}.

## License

Code and configuration: Apache-2.0 (see LICENSE). Weights you pre-train are yours.
"""


def render(variant: dict) -> dict:
    return {
        "configs/metadata.json": metadata(variant),
        "configs/train.json": train_config(variant),
        "configs/evaluate.json": evaluate_config(variant),
        "configs/multi_gpu_train.json": multi_gpu_config(variant),
        "configs/smoke.json": smoke_config(variant),
        "configs/logging.conf": bundle_files.LOGGING_CONF,
        "docs/README.md": readme(variant),
        "LICENSE": bundle_files.APACHE_NOTICE.format(year=2026, weights_note=""),
    }
