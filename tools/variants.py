"""The variant table: the only place where a bundle of the collection is described.

`python tools/generate_bundles.py` renders every row of `VARIANTS` into `bundles/<name>/`; `--check` fails when a
committed bundle differs from what this table renders. A row's `version` and `changelog` are the bundle's own:
bump the version and add a changelog line whenever the rendered bundle changes. `FAMILIES` (detector + encoder +
recipe) and `INITIALISATIONS` (released pre-trained encoders) are the lookup tables the rows name.
"""

from meddet import version_key
from meddet.networks import NNDET_BACKBONE, RESENC_L

# the released encoders' architecture, as the bundles' JSON keys name it
_RESENC_L = {"encoder_features": list(RESENC_L["features_per_stage"]), "encoder_strides": list(RESENC_L["strides"]),
             "encoder_blocks": list(RESENC_L["blocks_per_stage"])}
_NNDET = {"encoder_features": list(NNDET_BACKBONE["features_per_stage"]),
          "encoder_strides": list(NNDET_BACKBONE["strides"])}

HF = "https://huggingface.co/MIC-DKFZ/{repo}/resolve/main/checkpoint_final.pth"

PAPER = ("Eckstein et al., The Missing Piece: A Case for Pre-Training in 3D Medical Object Detection, "
         "MICCAI 2025")

# Released pre-trained encoders (DESIGN §1); model cards: CC-BY-4.0, single-channel.
INITIALISATIONS = {
    "scratch": None,
    "mae": {
        "repo": "ResEncL-MissingPiece-MAE",
        "method": "MAE",
        "kind": "reconstruction (dense masked autoencoder)",
        "data": "CT-RATE",
        "citation": "He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022",
    },
    "s3d": {
        "repo": "ResEncL-MissingPiece-S3D",
        "method": "Spark-3D",
        "kind": "reconstruction (sparse-convolution masked autoencoder, SparK-style)",
        "data": "CT-RATE + ABCD",
        "citation": ("Tian et al., Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked "
                     "Modeling, ICLR 2023"),
    },
    "mg": {
        "repo": "ResEncL-MissingPiece-MG",
        "method": "Models Genesis",
        "kind": "reconstruction (image restoration of transformed sub-volumes)",
        "data": "see the model card",
        "citation": "Zhou et al., Models Genesis, Medical Image Analysis 2021",
    },
    "voco": {
        "repo": "ResEncL-MissingPiece-VoCo",
        "method": "VoCo",
        "kind": "contrastive (volume contrast); pre-training patch 192x192x64",
        "data": "see the model card",
        "citation": ("Wu et al., VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for 3D Medical "
                     "Image Analysis, CVPR 2024"),
    },
    "multitalent": {
        "repo": "ResEncL-MissingPiece-MultiTalent",
        "method": "MultiTalent",
        "kind": "supervised segmentation on 65 public datasets, one stem per dataset (CT stem by default)",
        "data": "public segmentation datasets",
        "citation": ("Ulrich et al., MultiTalent: A Multi-Dataset Approach to Medical Image Segmentation, "
                     "MICCAI 2023"),
    },
    "multitalent_native": {
        "repo": "RetinaUNet-MissingPiece-MultiTalent",
        "method": "MultiTalent",
        "kind": ("supervised segmentation on 65 public datasets, nnDetection conv backbone; the selected stem "
                 "(CT by default) is fused in as the first block of level 0"),
        "data": "public segmentation datasets",
        "citation": ("Ulrich et al., MultiTalent: A Multi-Dataset Approach to Medical Image Segmentation, "
                     "MICCAI 2023"),
    },
}

# Tiny CPU configurations (configs/smoke.json): minutes on 2 cores. Anchors planned on the easy synthetic
# preset: python tools/plan.py --level_scales "[1,2]" --anchors_per_axis 2.
_SMOKE_SCHEDULE = {
    "patch_size": [32, 32, 32],
    "spacing": [1.5, 1.5, 2.0],
    "batch_size": 4,
    "max_epochs": 24,
    "epoch_length": 25,
    # three validations (epochs 8, 16, 24): each costs about as much as an epoch of training on 2 cores
    "val_interval": 8,
    "checkpoint_interval": 25,
    "cache_rate": 1.0,
    "num_workers": 0,
    "tta_mirror_axes": [],
    "sw_overlap": 0.5,
    # windows per network call: on CPU four 32^3 windows per call halve the sliding-window time (same detections)
    "sw_batch_size": 4,
    "pretrained_checkpoint": "",
}
_SMOKE_RETINAUNET = {
    **_SMOKE_SCHEDULE,
    "encoder_features": [8, 16, 32, 32],
    "encoder_strides": [1, 2, 2, 2],
    "encoder_blocks": [1, 1, 1, 1],
    "detection_levels": [2, 3],
    "fpn_channels": 32,
    "head_convs": 1,
    "warmup_iterations": 20,
    "learning_rate": 0.02,
    "anchor_shapes": [[6, 6, 4], [6, 6, 6], [6, 8, 4], [6, 8, 6], [8, 6, 4], [8, 6, 6], [8, 8, 4], [8, 8, 6]],
}

FAMILIES = {
    "retinaunet_resencl": {
        "detector": "retinaunet",
        "title": "Retina U-Net, ResEnc-L encoder",
        "network_factory": "meddet.networks.retina_unet_resenc",
        "network": {**_RESENC_L, "detection_levels": [2, 3, 4, 5]},
        "smoke": _SMOKE_RETINAUNET,
    },
    "retinaunet_nndet": {
        "detector": "retinaunet",
        "title": "Retina U-Net, nnDetection conv backbone",
        "network_factory": "meddet.networks.retina_unet_nndet",
        "network": {**_NNDET, "detection_levels": [2, 3, 4, 5]},
        # the plain conv encoder needs a larger step than the residual one to converge in the smoke schedule
        "smoke": {**{key: value for key, value in _SMOKE_RETINAUNET.items() if key != "encoder_blocks"},
                  "learning_rate": 0.04},
    },
    "defdetr_resencl": {
        "detector": "defdetr",
        "title": "Two-stage 3D Deformable DETR, ResEnc-L encoder",
        "network_factory": "meddet.networks.deformable_detr_resenc",
        "network": {**_RESENC_L, "detection_levels": [2, 3, 4, 5]},
        "smoke": {
            **_SMOKE_SCHEDULE,
            "encoder_features": [8, 16, 32, 32],
            "encoder_strides": [1, 2, 2, 2],
            "encoder_blocks": [1, 1, 1, 1],
            "detection_levels": [1, 2, 3],
            "d_model": 32,
            "num_heads": 4,
            "dim_feedforward": 128,
            "num_encoder_layers": 2,
            "num_decoder_layers": 2,
            "num_queries": 12,
            "learning_rate": 0.001,
            "warmup_iterations": 0,
        },
    },
}


# Self-supervised pre-training of the ResEnc encoders (nnssl's recipes, DESIGN §11). A `pretraining` row renders a
# bundle that writes `models/checkpoint_final.pth` in the released format; `initialisation` names the detection
# initialisation it produces (`mae` feeds the `*_mae_detection` bundles).
PRETRAINING_RECIPE = {
    "optimizer": "SGD",
    "learning_rate": 1e-2,
    "momentum": 0.99,
    "weight_decay": 3e-5,
    "max_epochs": 1000,
    "epoch_length": 250,
    "batch_size": 8,  # across all ranks
    "spacing": [1.0, 1.0, 1.0],
    "intensity_normalization": "zscore",
    "recommended_downstream_patchsize": [160, 160, 160],
}
PRETRAINING_METHODS = {
    "mae": {
        "method": "MAE",
        "kind": "reconstruction (dense masked autoencoder)",
        "citation": INITIALISATIONS["mae"]["citation"],
        "network": "meddet.pretraining.build_resenc_unet",
        "objective": {"_target_": "meddet.pretraining.MaskedReconstruction", "mask_ratio": "@mask_ratio",
                      "block_size": "@mask_block_size"},
        "transforms": "meddet.pretraining.mae_transforms",
        "settings": {"patch_size": [160, 160, 160], "mask_ratio": 0.75, "mask_block_size": 16, "decoder_convs": 1,
                     "clip_grad_norm": 12.0, "spatial_augmentation": True},
        # rotating a 32^3 crop fills a large share of it with zeros: the smoke preset only crops and mirrors
        "smoke": {"patch_size": [32, 32, 32], "mask_block_size": 8, "spatial_augmentation": False},
    },
    "simclr": {
        "method": "SimCLR",
        "kind": "contrastive (two overlapping crops of one patch, NT-Xent)",
        "citation": "Chen et al., A Simple Framework for Contrastive Learning of Visual Representations, ICML 2020",
        "network": "meddet.pretraining.build_contrastive_network",
        "objective": {"_target_": "meddet.pretraining.ContrastiveViews", "temperature": "@temperature"},
        "transforms": "meddet.pretraining.simclr_transforms",
        "settings": {"patch_size": [192, 192, 64], "crop_size": [64, 64, 64], "min_overlap": 0.5, "temperature": 0.5,
                     "hidden_dim": 2048, "projection_dim": 2048, "clip_grad_norm": 0.1},
        "smoke": {"patch_size": [48, 48, 32], "crop_size": [32, 32, 32], "hidden_dim": 256, "projection_dim": 128},
    },
}
# The pre-training smoke encoder is the detectors' smoke encoder, so its checkpoint feeds their smoke presets.
_SMOKE_PRETRAINING = {
    **{key: _SMOKE_RETINAUNET[key] for key in ("encoder_features", "encoder_strides", "encoder_blocks", "spacing")},
    "intensity_normalization": "ct",  # the detectors' CT scheme with the same plan: the encoder sees what it will see
    "batch_size": 4,
    "max_epochs": 10,
    "epoch_length": 20,
    "val_interval": 5,
    "checkpoint_interval": 20,
    "cache_rate": 1.0,
    "num_workers": 0,
    "recommended_downstream_patchsize": _SMOKE_RETINAUNET["patch_size"],
}
FAMILIES["resencl"] = {
    "kind": "pretraining",
    "title": "ResEnc-L encoder",
    "network": {key: FAMILIES["retinaunet_resencl"]["network"][key]
                for key in ("encoder_features", "encoder_strides", "encoder_blocks")},
    "smoke": _SMOKE_PRETRAINING,
}

# Where a bundle departs from the paper's released fine-tuning recipe: (what differs, why), per detector family,
# plus the lines that apply to one initialisation only. Rendered into every bundle's README.
_IN_PLANE_ROTATION = (
    "rotation augmentation turns the patch in the x-y plane only (+-30 deg, p 0.2), not about all three axes",
    "boxes follow an in-plane rotation exactly as the inscribed ellipsoid (RandRotateBoxd); out-of-plane rotation "
    "of anisotropic CT mixes the thick-slice axis into the others")
RECIPE_DIFFERENCES = {
    "retinaunet": [
        ("box regression uses smooth L1 with beta 1.0 (nnDetection v0.1's default), the release plain L1 (weight 1, "
         "summed over the 6 deltas, learnable per-level scale: kept)",
         "the collection's first release followed nnDetection v0.1; `--detector#smooth_l1_beta 0` gives the "
         "release's plain L1"),
        ("classification and regression losses are divided by the number of positive anchors in the batch; the "
         "release divides by an EMA of that number (beta 0.7, bias correction over 5000 steps)",
         "not implemented yet; the EMA smooths the loss scale of batches with few positives (4 patches of 128^3)"),
        _IN_PLANE_ROTATION,
        ("an axis of a volume shorter than the 128-voxel window is tiled at its own length rounded up to 32; the "
         "release pads it to the window",
         "no network time on padding (a 96-slice volume runs the network on 96/128 of the padded pass's voxels); on 16 synthetic volumes "
         "thinner than the smoke window the smoke model scored AP@0.1 0.109 this way and 0.029 with padded windows "
         "(both low: it was trained on thicker volumes); an override file with `{\"inferer#size_divisible\": null}` "
         "restores the padding"),
    ],
    "defdetr": [
        ("no weight decay on norms and biases",
         "the parameter grouping is shared with the Retina U-Net bundles (nnDetection's choice); the release decays "
         "every parameter"),
        ("gradient norm clipped at 0.1",
         "the original Deformable DETR recipe (Zhu et al. 2021) clips at 0.1; it guards the first steps of a randomly "
         "initialised transformer at batch 4; the release does not clip (`--clip_grad_norm 0` follows it)"),
        _IN_PLANE_ROTATION,
    ],
}
RECIPE_DIFFERENCES_BY_INITIALISATION = {
    "multitalent_native": [
        ("ReLU activations and two convs per head, where the release's native MultiTalent fine-tuning uses "
         "LeakyReLU (slope 0.01) and one head conv",
         "the same network as `retinaunet_nndet_scratch_detection`, so the two bundles differ in the encoder's "
         "initialisation only; activations hold no weights, so the released encoder loads either way"),
    ],
}


def recipe_differences(variant: dict) -> list[tuple[str, str]]:
    """The (difference, reason) lines of a detection bundle, in the order its README lists them."""
    family = "defdetr" if variant["family"].startswith("defdetr") else "retinaunet"
    return RECIPE_DIFFERENCES[family] + RECIPE_DIFFERENCES_BY_INITIALISATION.get(variant["initialisation"], [])


# Speed figures the bundle READMEs quote: `python tools/benchmark.py` (1 thread, interleaved rounds, medians) on
# this project's 2-core AMD EPYC machine, 2026-12-06; no GPU was available for GPU figures.
MEASURED_SPEED = {
    "machine": "one thread of a 2-core AMD EPYC machine",
    "loader_patches_per_s": 21.4,  # 128^3, every augmentation, cached 450x450x190 CT
    "loader_disk_cache_patches_per_s": 18.7,  # the same, memory-mapped from cache_dir (page cache warm)
    "loader_monai_crop_patches_per_s": 1.09,  # the same chain with MONAI's RandCropBoxByPosNegLabeld
    "zoo_volume": "192x192x96",
    "ours_inference_s": 44.3,  # Retina U-Net ResEnc-L, no TTA, 4 windows
    "zoo_inference_s": 42.1,  # the model zoo RetinaNet, the whole volume in one pass
    "inference_vs_zoo_ratio": 1.05,
    # the same with 0.3.x inference (padded windows, segmentation computed): 79.6 s vs 41.5 s, in one run where the
    # current inference measured 1.03x
    "inference_vs_zoo_ratio_before": 1.92,
    "one_window_vs_zoo_ratio": 0.57,  # on 128x128x64, one window
    "tta_cost": 7.9,  # 8 mirror passes / 1, per volume (128x128x64, full network: 56.4 s vs 7.1 s)
    "inference_vs_forward": (1.03, 1.11),  # smoke Retina U-Net, DETR: whole-volume inference / bare forward
    "train_step_vs_forward_backward": (1.05, 1.02),  # smoke Retina U-Net, DETR
    "wbc_10k_s": (0.054, 0.53),  # weighted box clustering of 10k boxes, MONAI non_max_suppression
    "whole_volume_ap": (0.975, 0.559),  # smoke model's AP@0.1: patch-size tiles, whole-volume windows
    "overlap_025_ap": 0.884,  # the same model, patch-size tiles at sw_overlap 0.25
    "grown_window_ap": 0.655,  # the same model, a window stretched over any axis up to 1.25x the patch
}


# Which pre-training bundle makes the small checkpoint a pre-trained detection bundle's smoke preset starts from
# (the closest method the collection can pre-train; a user may pass any other with --pretrained_checkpoint).
SMOKE_CHECKPOINT_SOURCE = {"mae": "mae", "s3d": "mae", "mg": "mae", "voco": "simclr", "multitalent": "mae"}


_V020 = {
    "scratch": "meddet 0.2.0 (shared with the new pre-training bundles); this bundle computes the same as in 0.1.0",
    "pretrained": ("meddet 0.2.0; the smoke preset starts from a small pre-trained checkpoint (made by a pre-training "
                   "bundle's smoke preset, or passed with --pretrained_checkpoint) instead of training from scratch"),
}


_V030_DETECTION = ("meddet 0.3.0: reads DICOM series folders, .mhd and .nrrd like NIfTI; datalist ignore_box regions "
                   "(no loss there, neither TP nor FP in evaluation) and diameter_mm (evaluation adds the LUNA16 "
                   "CPM by the official rules); the centre-distance FROC follows the LUNA16 script")
_V011_PRETRAINING = ("meddet 0.3.0: reads DICOM series folders, .mhd and .nrrd like NIfTI; "
                     "this bundle computes the same as in 0.1.0")
_V040_DETECTION = ("meddet 0.4.0: the training crop draws MONAI's positive/negative patch distribution from the "
                   "boxes alone (no whole-volume mask or copy per patch: 14x the patches/s per loader worker on a "
                   "450x450x190 CT); cache_dir keeps preprocessed volumes on disk, memory-mapped, instead of in RAM; "
                   "Retina U-Net skips its segmentation branch at inference and tiles axes shorter than the window "
                   "at their own length (size_divisible), and its export tuple has no segmentation map; the "
                   "Deformable DETR network_def takes detection_levels, num_heads and num_points (were "
                   "feature_levels, n_heads, n_points), the names of the keys that set them")
_V012_PRETRAINING = "meddet 0.4.0; this bundle computes the same as in 0.1.0"
_V041_DETECTION = ("docs: served to MONAI Label / 3D Slicer through the collection's tools/monailabel_app.py (the "
                   "viewer's LPS frame set in the served copy, no hand edits); the vendored meddet copy leaves out the "
                   "downloader (meddet/hub.py), which no bundle runs; computes the same as 0.4.0")
_V013_PRETRAINING = ("the vendored meddet copy leaves out the downloader (meddet/hub.py), which no bundle runs; "
                     "computes the same as 0.1.2")


def _row(family: str, initialisation: str, changelog: dict, kind: str = "detection") -> dict:
    """A bundle: its version is the newest of its changelog."""
    name = f"{family}_{initialisation.replace('_native', '')}_{kind}"
    version = max(changelog, key=version_key)
    return {"name": name, "family": family, "initialisation": initialisation, "kind": kind, "version": version,
            "changelog": dict(changelog)}


def _detection(family: str, initialisation: str, first_release: str) -> dict:
    later = _V020["scratch" if initialisation == "scratch" else "pretrained"]
    return _row(family, initialisation, {"0.1.0": first_release, "0.2.0": later, "0.3.0": _V030_DETECTION,
                                                      "0.4.0": _V040_DETECTION, "0.4.1": _V041_DETECTION})


def _pretraining(method: str, first_release: str) -> dict:
    return _row("resencl", method, {"0.1.0": first_release, "0.1.1": _V011_PRETRAINING, "0.1.2": _V012_PRETRAINING,
                                    "0.1.3": _V013_PRETRAINING}, kind="pretraining")


VARIANTS = [
    _detection("retinaunet_resencl", "scratch", "initial release: Retina U-Net on ResEnc-L, random initialisation"),
    _detection("retinaunet_resencl", "mae", "initial release: Retina U-Net on ResEnc-L, MAE pre-trained encoder"),
    _detection("retinaunet_resencl", "s3d", "initial release: Retina U-Net on ResEnc-L, Spark-3D pre-trained encoder"),
    _detection("retinaunet_resencl", "mg",
               "initial release: Retina U-Net on ResEnc-L, Models Genesis pre-trained encoder"),
    _detection("retinaunet_resencl", "voco", "initial release: Retina U-Net on ResEnc-L, VoCo pre-trained encoder"),
    _detection("retinaunet_resencl", "multitalent",
               "initial release: Retina U-Net on ResEnc-L, MultiTalent pre-trained encoder"),
    _detection("retinaunet_nndet", "scratch",
               "initial release: Retina U-Net on nnDetection's conv backbone, random initialisation"),
    _detection("retinaunet_nndet", "multitalent_native",
               "initial release: Retina U-Net on nnDetection's conv backbone, MultiTalent pre-trained encoder"),
    _detection("defdetr_resencl", "scratch", "initial release: Deformable DETR on ResEnc-L, random initialisation"),
    _detection("defdetr_resencl", "mae", "initial release: Deformable DETR on ResEnc-L, MAE pre-trained encoder"),
    _detection("defdetr_resencl", "s3d", "initial release: Deformable DETR on ResEnc-L, Spark-3D pre-trained encoder"),
    _detection("defdetr_resencl", "mg",
               "initial release: Deformable DETR on ResEnc-L, Models Genesis pre-trained encoder"),
    _detection("defdetr_resencl", "voco", "initial release: Deformable DETR on ResEnc-L, VoCo pre-trained encoder"),
    _detection("defdetr_resencl", "multitalent",
               "initial release: Deformable DETR on ResEnc-L, MultiTalent pre-trained encoder"),
    _pretraining("mae", "initial release: MAE pre-training of a ResEnc-L encoder on unlabeled volumes"),
    _pretraining("simclr", "initial release: SimCLR pre-training of a ResEnc-L encoder on unlabeled volumes"),
]
