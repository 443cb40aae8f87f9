"""Self-supervised pre-training of the detectors' encoders on unlabeled volumes (the pre-training bundles).

Writes checkpoints in the released nnssl format that every detection bundle's `pretrained_checkpoint` takes.
Recipes (nnssl): dense masked autoencoder (`MaskedReconstruction`) on a ResEnc U-Net, SimCLR
(`ContrastiveViews`) on the encoder under a projection head.
"""

from meddet.pretraining.architecture import (
    ContrastiveNetwork,
    build_contrastive_network,
    build_resenc_unet,
    resenc_unet_arch_kwargs,
)
from meddet.pretraining.handlers import (
    NnsslCheckpointWriter,
    PretrainingValidation,
    load_pretraining_weights,
    save_reconstruction_png,
)
from meddet.pretraining.objectives import ContrastiveViews, MaskedReconstruction, block_mask, nt_xent_loss
from meddet.pretraining.steps import PretrainingStep
from meddet.pretraining.transforms import OverlappingCropPaird, mae_transforms, simclr_transforms

__all__ = [
    "ContrastiveNetwork",
    "ContrastiveViews",
    "MaskedReconstruction",
    "NnsslCheckpointWriter",
    "OverlappingCropPaird",
    "PretrainingStep",
    "PretrainingValidation",
    "block_mask",
    "build_contrastive_network",
    "build_resenc_unet",
    "load_pretraining_weights",
    "mae_transforms",
    "nt_xent_loss",
    "resenc_unet_arch_kwargs",
    "save_reconstruction_png",
    "simclr_transforms",
]
