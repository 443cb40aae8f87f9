"""What every detector's `forward` does with its inputs: batching, checking targets, and choosing losses, patch
predictions or the injected whole-volume inferer. Shared so both detector families behave identically to engines and MONAI
Label (`detector(images, use_inferer=True)`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meddet.data.boxes import IGNORE_LABEL


def as_batch(images) -> torch.Tensor:
    """Tensor [B, C, X, Y, Z], a list of equally sized [C, X, Y, Z] tensors, or one [C, X, Y, Z] -> [B, C, X, Y, Z]."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images is an empty list")
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) != 1 or len(next(iter(shapes))) != 4:
            raise ValueError(
                f"a list of images must hold [C, X, Y, Z] tensors of one shape to be batched, got {sorted(shapes)}"
            )
        images = torch.stack(list(images))
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = images[None]  # a single [C, X, Y, Z] image
    if not isinstance(images, torch.Tensor) or images.ndim != 5:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a Tensor [B, C, X, Y, Z] or a list of [C, X, Y, Z], got {shape}")
    return images


def detector_forward(detector, images, targets: Sequence[dict] | None, use_inferer: bool):
    """Training mode: `detector.compute_losses(batch, targets)`. Eval mode: `detector.inferer(batch,
    detector.predict_patches)` per image when `use_inferer` (images of a list may differ in size), otherwise
    `detector.predict_patches(images)`."""
    name = type(detector).__name__
    if detector.training:
        if targets is None:
            raise ValueError(f"{name} in training mode needs targets (list of dicts 'box', 'label')")
        return detector.compute_losses(as_batch(images), targets)
    if use_inferer:
        if detector.inferer is None:
            raise RuntimeError("use_inferer=True but no inferer is set: pass `inferer=` or call `set_inferer(inferer)`")
        if isinstance(images, torch.Tensor):
            return detector.inferer(as_batch(images), detector.predict_patches)
        return [det for image in images for det in detector.inferer(as_batch([image]), detector.predict_patches)]
    return detector.predict_patches(images)


def check_targets(targets: Sequence[dict], batch: int, num_classes: int, device
                  ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per image (boxes float [N, 6] `xyzxyz`, labels long [N], ignore regions float [I, 6] `xyzxyz`) on `device`,
    after checking counts, label range and box extents; N and I may be 0. Boxes labelled `IGNORE_LABEL` are the
    ignore regions (`meddet.data.transforms.MergeIgnoreBoxesd`)."""
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
    checked = []
    for index, target in enumerate(targets):
        if "box" not in target or "label" not in target:
            raise KeyError(f"target {index} needs 'box' and 'label' entries, has {sorted(target)}")
        boxes = torch.as_tensor(target["box"], dtype=torch.float32, device=device).reshape(-1, 6)
        labels = torch.as_tensor(target["label"], device=device).reshape(-1).long()
        if len(boxes) != len(labels):
            raise ValueError(f"target {index}: {len(boxes)} boxes but {len(labels)} labels")
        ignore = labels == IGNORE_LABEL
        boxes, labels, ignore_boxes = boxes[~ignore], labels[~ignore], boxes[ignore]
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"target {index}: labels must lie in [0, {num_classes}) (or {IGNORE_LABEL} for an "
                             f"ignore region), got {labels.tolist()}")
        if bool((boxes[:, 3:] <= boxes[:, :3]).any()):
            raise ValueError(f"target {index}: every box needs x2 > x1, y2 > y1, z2 > z1 (xyzxyz), got {boxes}")
        checked.append((boxes, labels, ignore_boxes))
    return checked


def centres_inside(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """[P] whether each point (P, 3) lies inside any of the `xyzxyz` boxes (B, 6)."""
    if len(boxes) == 0 or len(points) == 0:
        return torch.zeros(len(points), dtype=torch.bool, device=points.device)
    points = points[:, None, :]
    return ((points >= boxes[None, :, :3]) & (points <= boxes[None, :, 3:])).all(dim=-1).any(dim=1)
