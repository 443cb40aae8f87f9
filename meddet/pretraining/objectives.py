"""Pre-training objectives: what a batch of patches is turned into, and the loss the network minimises.

Each objective is called as `objective(network, samples, device, generator=None)` with the samples of one
batch (dicts from the pre-training transforms) and returns a dict with `loss` (a scalar tensor) plus the tensors
worth showing (`image`, `masked`, `reconstruction` for MAE). `generator` fixes the random masks (validation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskedReconstruction", "ContrastiveViews", "block_mask", "nt_xent_loss"]


def _stack(samples: Sequence[dict], key: str, device: torch.device) -> torch.Tensor:
    return torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device, dtype=torch.float32)


def block_mask(batch: int, spatial_shape: Sequence[int], block_size: int, mask_ratio: float,
               device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep-mask `[batch, 1, *spatial_shape]` (1 = visible, 0 = masked) of whole `block_size`^3 blocks.

    The patch is divided into a grid of blocks (each axis must be a multiple of `block_size`); per sample,
    `int(mask_ratio * number of blocks)` blocks chosen by a random permutation are masked, and the grid is
    nearest-upsampled to voxels (nnssl's MAE: 160^3 patch, 16^3 blocks, a 10^3 grid, ratio 0.75).
    """
    shape = [int(s) for s in spatial_shape]
    if any(s % block_size for s in shape):
        raise ValueError(f"block_mask: patch {shape} is not a multiple of the mask block size {block_size}")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"block_mask: mask_ratio must lie in (0, 1), got {mask_ratio}")
    grid = [s // block_size for s in shape]
    cells = grid[0] * grid[1] * grid[2]
    masked = int(mask_ratio * cells)
    keep = torch.ones(batch, cells)
    for b in range(batch):
        keep[b, torch.randperm(cells, generator=generator)[:masked]] = 0.0
    keep = keep.reshape(batch, 1, *grid)
    for axis in range(3):
        keep = keep.repeat_interleave(block_size, dim=2 + axis)
    return keep.to(device)


class MaskedReconstruction:
    """Dense masked autoencoder (nnssl's MAE for CNNs): zero the masked blocks of the input, reconstruct the
    whole patch, mean squared error over the masked voxels only."""

    def __init__(self, mask_ratio: float = 0.75, block_size: int = 16):
        self.mask_ratio = float(mask_ratio)
        self.block_size = int(block_size)

    def __call__(self, network: nn.Module, samples: Sequence[dict], device: torch.device,
                 generator: torch.Generator | None = None) -> dict:
        image = _stack(samples, "image", device)
        keep = block_mask(image.shape[0], image.shape[2:], self.block_size, self.mask_ratio, device, generator)
        masked = image * keep
        reconstruction = network(masked)
        hidden = 1.0 - keep
        error = (reconstruction.float() - image) ** 2 * hidden
        loss = error.sum() / (hidden.sum() * image.shape[1]).clamp_min(1.0)
        return {"loss": loss, "image": image, "masked": masked, "reconstruction": reconstruction}


def nt_xent_loss(z_1: torch.Tensor, z_2: torch.Tensor, temperature: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent (SimCLR) over the 2N embeddings of N positive pairs `(z_1[i], z_2[i])`: cosine similarity divided
    by `temperature`, cross-entropy of each embedding against its partner among the 2N - 1 others, averaged.
    Returns (loss, top-1 accuracy of finding the partner)."""
    n = z_1.shape[0]
    z = F.normalize(torch.cat([z_1, z_2]).float(), dim=1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    loss = F.cross_entropy(logits, partner)
    accuracy = (logits.argmax(dim=1) == partner).float().mean()
    return loss, accuracy


class ContrastiveViews:
    """SimCLR: the two augmented, overlapping crops of each patch (`image`, `image_pair`) are a positive pair, the
    other crops of the batch are negatives; NT-Xent at `temperature` (nnssl: 0.5, cosine similarity)."""

    def __init__(self, temperature: float = 0.5):
        self.temperature = float(temperature)

    def __call__(self, network: nn.Module, samples: Sequence[dict], device: torch.device,
                 generator: torch.Generator | None = None) -> dict:
        if len(samples) < 2 and network.training:
            # a lone pair has no negatives: its loss is 0 and nothing would be learnt (validation tolerates it)
            raise ValueError(f"ContrastiveViews: a training batch needs at least 2 patches, got {len(samples)} "
                             "(the negatives come from the other patches of the batch)")
        views = torch.cat([_stack(samples, "image", device), _stack(samples, "image_pair", device)])
        embeddings = network(views)
        loss, accuracy = nt_xent_loss(*embeddings.chunk(2), temperature=self.temperature)
        return {"loss": loss, "accuracy": accuracy}
