"""What every detector's `forward` does with its inputs: batching, and choosing losses, patch predictions or
the injected whole-volume inferer. Shared so both detector families behave identically to engines and MONAI
Label (`detector(images, use_inferer=True)`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
