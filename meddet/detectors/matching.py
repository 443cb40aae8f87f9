"""Set matching for DETR-style detectors: matching cost and optimal one-to-one assignment.

Boxes here are normalised `cccwhd` (fractions of the patch). GIoU is scale-free, but MONAI's box functions
add float32 eps to volumes, which is not negligible for small boxes in normalised units (a 2-voxel box in
a 128-voxel patch has volume 4e-6); pass `image_size` to compute GIoU on voxel-sized boxes instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data.box_utils import box_giou, convert_box_mode
from scipy.optimize import linear_sum_assignment


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment between queries and targets.

    Args:
        cost: [Q, G] matching cost.

    Returns:
        (query_idx, gt_idx): long tensors of length min(Q, G) on the device of ``cost``; query_idx[i] is
        assigned to gt_idx[i], sorted by query index.
    """
    if cost.ndim != 2:
        raise ValueError(f"hungarian_match: cost must be [Q, G], got shape {tuple(cost.shape)}")
    device = cost.device
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    cost = cost.detach().float().cpu()
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("hungarian_match: the cost matrix contains NaN or infinite values")
    query_idx, gt_idx = linear_sum_assignment(cost.numpy())
    return (
        torch.as_tensor(query_idx, dtype=torch.long, device=device),
        torch.as_tensor(gt_idx, dtype=torch.long, device=device),
    )


def cccwhd_to_xyzxyz(boxes: torch.Tensor, image_size: Sequence[float] | None = None) -> torch.Tensor:
    """[N, 6] cccwhd -> xyzxyz, optionally scaled per axis by ``image_size`` (X, Y, Z)."""
    boxes = convert_box_mode(boxes, src_mode="cccwhd", dst_mode="xyzxyz")
    if image_size is not None:
        scale = torch.as_tensor(list(image_size), dtype=boxes.dtype, device=boxes.device)
        boxes = boxes * torch.cat([scale, scale])
    return boxes


def match_cost(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_boxes: torch.Tensor,
    cost_class: float = 2.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    focal_alpha: float = 0.75,
    focal_gamma: float = 1.0,
    image_size: Sequence[float] | None = None,
) -> torch.Tensor:
    """Matching cost [Q, G] = cost_class * C_class + cost_bbox * C_L1 + cost_giou * C_GIoU (Deformable DETR).

    - C_class: focal-style, with p the sigmoid probability of the target's class:
      alpha * (1 - p) ** gamma * (-log p) - (1 - alpha) * p ** gamma * (-log(1 - p));
    - C_L1: L1 distance of the normalised cccwhd vectors;
    - C_GIoU: -GIoU (MONAI `box_giou` on `xyzxyz` boxes; scaled by ``image_size`` when given).

    Args:
        pred_logits: [Q, K] class logits. pred_boxes: [Q, 6] normalised cccwhd (positive sizes).
        gt_labels: [G] 0-based class ids. gt_boxes: [G, 6] normalised cccwhd.
        image_size: optional patch size (X, Y, Z) in voxels for the GIoU term (GIoU does not depend on it
            except through MONAI's eps).
    """
    with torch.no_grad():
        prob = pred_logits.float().sigmoid()[:, gt_labels.long()]  # [Q, G]
        eps = 1e-8
        positive = focal_alpha * (1 - prob) ** focal_gamma * -(prob + eps).log()
        negative = (1 - focal_alpha) * prob ** focal_gamma * -(1 - prob + eps).log()
        class_term = positive - negative
        l1_term = torch.cdist(pred_boxes.float(), gt_boxes.float(), p=1)
        giou = box_giou(cccwhd_to_xyzxyz(pred_boxes.float(), image_size),
                        cccwhd_to_xyzxyz(gt_boxes.float(), image_size))
        return cost_bbox * l1_term + cost_class * class_term - cost_giou * giou
