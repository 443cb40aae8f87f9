"""The variant table: the only place where a bundle of the collection is described.

`python tools/generate_bundles.py` renders every row of `VARIANTS` into `bundles/<name>/`; `--check` fails when a
committed bundle differs from what this table renders. A row's `version` and `changelog` are the bundle's own:
bump the version and add a changelog line whenever the rendered bundle changes. `FAMILIES` (detector + encoder +
recipe) and `INITIALISATIONS` (released pre-trained encoders) are the lookup tables the rows name.
"""

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
    "val_interval": 3,
    "checkpoint_interval": 25,
    "cache_rate": 1.0,
    "num_workers": 0,
    "tta_mirror_axes": [],
    "sw_overlap": 0.5,
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
        "network": {"encoder_features": [32, 64, 128, 256, 320, 320], "encoder_strides": [1, 2, 2, 2, 2, 2],
                    "encoder_blocks": [1, 3, 4, 6, 6, 6], "detection_levels": [2, 3, 4, 5]},
        "smoke": _SMOKE_RETINAUNET,
    },
    "retinaunet_nndet": {
        "detector": "retinaunet",
        "title": "Retina U-Net, nnDetection conv backbone",
        "network_factory": "meddet.networks.retina_unet_nndet",
        "network": {"encoder_features": [32, 64, 128, 256, 320, 320], "encoder_strides": [1, 2, 2, 2, 2, 2],
                    "detection_levels": [2, 3, 4, 5]},
        # the plain conv encoder needs a larger step than the residual one to converge in the smoke schedule
        "smoke": {**{key: value for key, value in _SMOKE_RETINAUNET.items() if key != "encoder_blocks"},
                  "learning_rate": 0.04},
    },
    "defdetr_resencl": {
        "detector": "defdetr",
        "title": "Two-stage 3D Deformable DETR, ResEnc-L encoder",
        "network_factory": "meddet.networks.deformable_detr_resenc",
        "network": {"encoder_features": [32, 64, 128, 256, 320, 320], "encoder_strides": [1, 2, 2, 2, 2, 2],
                    "encoder_blocks": [1, 3, 4, 6, 6, 6], "detection_levels": [2, 3, 4, 5]},
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


def _row(family: str, initialisation: str, changelog: str) -> dict:
    name = f"{family}_{initialisation.replace('_native', '')}_detection"
    return {"name": name, "family": family, "initialisation": initialisation, "version": "0.1.0",
            "changelog": {"0.1.0": changelog}}


VARIANTS = [
    _row("retinaunet_resencl", "scratch", "initial release: Retina U-Net on ResEnc-L, random initialisation"),
    _row("retinaunet_resencl", "mae", "initial release: Retina U-Net on ResEnc-L, MAE pre-trained encoder"),
    _row("retinaunet_resencl", "s3d", "initial release: Retina U-Net on ResEnc-L, Spark-3D pre-trained encoder"),
    _row("retinaunet_resencl", "mg", "initial release: Retina U-Net on ResEnc-L, Models Genesis pre-trained encoder"),
    _row("retinaunet_resencl", "voco", "initial release: Retina U-Net on ResEnc-L, VoCo pre-trained encoder"),
    _row("retinaunet_resencl", "multitalent",
         "initial release: Retina U-Net on ResEnc-L, MultiTalent pre-trained encoder"),
    _row("retinaunet_nndet", "scratch",
         "initial release: Retina U-Net on nnDetection's conv backbone, random initialisation"),
    _row("retinaunet_nndet", "multitalent_native",
         "initial release: Retina U-Net on nnDetection's conv backbone, MultiTalent pre-trained encoder"),
    _row("defdetr_resencl", "scratch", "initial release: Deformable DETR on ResEnc-L, random initialisation"),
    _row("defdetr_resencl", "mae", "initial release: Deformable DETR on ResEnc-L, MAE pre-trained encoder"),
    _row("defdetr_resencl", "s3d", "initial release: Deformable DETR on ResEnc-L, Spark-3D pre-trained encoder"),
    _row("defdetr_resencl", "mg", "initial release: Deformable DETR on ResEnc-L, Models Genesis pre-trained encoder"),
    _row("defdetr_resencl", "voco", "initial release: Deformable DETR on ResEnc-L, VoCo pre-trained encoder"),
    _row("defdetr_resencl", "multitalent",
         "initial release: Deformable DETR on ResEnc-L, MultiTalent pre-trained encoder"),
]
