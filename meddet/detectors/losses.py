"""Loss pieces of the Retina U-Net detector that MONAI does not provide in the form needed here.

- `sigmoid_focal_loss`: element-wise sigmoid focal loss on anchor logits (MONAI's FocalLoss reduces over
  image-shaped inputs; anchors need the raw per-element values to normalise by the positive count).
- `ellipsoid_segmentation_target`: the foreground mask for the auxiliary segmentation head. Datalists
  carry boxes, not masks, so each box stands for the ellipsoid inscribed in it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """Element-wise sigmoid focal loss (Lin et al. 2017), same shape as ``logits``.

    ``alpha`` weighs positive targets and ``1 - alpha`` negative ones; ``gamma`` down-weights easy
    examples by ``(1 - p_t) ** gamma``. Computed in float32.
    """
    logits = logits.float()
    targets = targets.float()
    probs = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * bce


def ellipsoid_segmentation_target(
    boxes_per_image: Sequence[torch.Tensor], spatial_shape: Sequence[int], device: torch.device | str | None = None
) -> torch.Tensor:
    """Foreground masks [B, 1, X, Y, Z] (long, 0/1) from `xyzxyz` voxel boxes.

    A voxel ``(i, j, k)`` (centre at ``(i + 0.5, j + 0.5, k + 0.5)`` in box coordinates) is foreground when
    its centre lies inside the ellipsoid inscribed in a box. A box too thin to contain any voxel centre
    still marks the voxel holding its centre, so that every box inside the patch leaves a trace. Parts of
    boxes outside the patch are ignored.

    Args:
        boxes_per_image: B tensors [N_b, 6] (N_b may be 0).
        spatial_shape: (X, Y, Z) of the patch.
        device: device of the output (default: that of the first box tensor, else CPU).
    """
    shape = [int(s) for s in spatial_shape]
    if device is None:
        device = boxes_per_image[0].device if len(boxes_per_image) else "cpu"
    mask = torch.zeros((len(boxes_per_image), 1, *shape), dtype=torch.long, device=device)
    limits = torch.tensor(shape, dtype=torch.float64)
    for image_index, boxes in enumerate(boxes_per_image):
        # Few boxes per patch: a per-box loop restricted to each box's voxel range is cheapest.
        for box in boxes.detach().to("cpu", torch.float64).reshape(-1, 6):
            low, high = box[:3], box[3:]
            centre, radius = (low + high) / 2, ((high - low) / 2).clamp(min=1e-6)
            start = low.floor().clamp(0, None).long()
            stop = torch.minimum(high.ceil(), limits).long()
            if torch.any(stop <= start):
                continue
            axes = [torch.arange(int(start[a]), int(stop[a]), dtype=torch.float64) for a in range(3)]
            normalised = [((axes[a] + 0.5 - centre[a]) / radius[a]) ** 2 for a in range(3)]
            inside = normalised[0][:, None, None] + normalised[1][None, :, None] + normalised[2][None, None, :] <= 1
            region = (slice(int(start[0]), int(stop[0])), slice(int(start[1]), int(stop[1])),
                      slice(int(start[2]), int(stop[2])))
            mask[image_index, 0][region] |= inside.to(device=device, dtype=torch.long)
            centre_voxel = centre.floor().long()
            if bool(torch.all(centre_voxel >= 0)) and bool(torch.all(centre_voxel < limits.long())):
                mask[image_index, 0, int(centre_voxel[0]), int(centre_voxel[1]), int(centre_voxel[2])] = 1
    return mask
