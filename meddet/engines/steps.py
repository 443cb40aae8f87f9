"""Iteration functions plugged into MONAI's SupervisedTrainer / SupervisedEvaluator (`iteration_update`).

The engine's `network` is the detector (a module that returns a loss dict when called with targets in
training mode, and detections when called with `use_inferer=True` in eval mode).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from ignite.engine import Engine

logger = logging.getLogger(__name__)


def flatten_samples(batch) -> list[dict]:
    """A DataLoader batch with `no_collation` is a list of items, each a dict or a list of crop dicts."""
    samples: list[dict] = []
    for item in batch if isinstance(batch, (list, tuple)) else [batch]:
        samples.extend(item if isinstance(item, (list, tuple)) else [item])
    return samples


def _targets(samples: Sequence[dict], device: torch.device) -> list[dict]:
    return [{"box": torch.as_tensor(s["box"], dtype=torch.float32).reshape(-1, 6).to(device),
             "label": torch.as_tensor(s["label"], dtype=torch.long).reshape(-1).to(device)} for s in samples]


def _autocast(engine: Engine, device: torch.device):
    return torch.autocast(device.type, enabled=bool(engine.amp) and device.type == "cuda",
                          **(getattr(engine, "amp_kwargs", None) or {}))


#: consecutive non-finite losses under AMP after which training stops (the GradScaler skips each such step)
MAX_NONFINITE_STEPS = 20


def _non_finite(engine: Engine, losses: dict) -> None:
    """A non-finite loss: an error in fp32; under AMP a step the GradScaler skips (fp16 overflow, which lowers its
    scale), counted and logged, and an error once `MAX_NONFINITE_STEPS` come in a row."""
    terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items() if v.numel() == 1)
    where = f"non-finite training loss at iteration {engine.state.iteration}: {terms}"
    if engine.scaler is None:
        raise FloatingPointError(where)
    engine.state.nonfinite_steps = getattr(engine.state, "nonfinite_steps", 0) + 1
    engine.state.skipped_steps = getattr(engine.state, "skipped_steps", 0) + 1
    if engine.state.nonfinite_steps >= MAX_NONFINITE_STEPS:
        raise FloatingPointError(f"{where}; {engine.state.nonfinite_steps} non-finite losses in a row under AMP "
                                 "(the learning rate or the data may be at fault, not the fp16 range)")
    logger.warning("%s; the step is skipped (%d skipped so far)", where, engine.state.skipped_steps)


def optimisation_step(engine: Engine, compute_losses, clip_grad_norm: float = 0.0) -> dict:
    """zero_grad -> forward under autocast (CUDA AMP when the engine has `amp`) -> non-finite check (see
    `_non_finite`) -> backward (through the engine's GradScaler when present) -> drop the gradients of
    `engine.state.frozen_parameters` (`FreezeEncoder` under DDP) -> optional global gradient-norm clipping (after
    unscaling) -> optimizer step. `compute_losses()` returns a dict whose "loss" entry is minimised; returns it as
    floats."""
    device = engine.state.device
    engine.network.train()
    engine.optimizer.zero_grad(set_to_none=True)
    with _autocast(engine, device):
        losses = compute_losses()
    loss = losses["loss"]
    if torch.isfinite(loss):
        engine.state.nonfinite_steps = 0
    else:
        _non_finite(engine, losses)
    scaler = engine.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()
    for parameter in getattr(engine.state, "frozen_parameters", ()):
        parameter.grad = None
    if clip_grad_norm > 0:
        if scaler is not None:
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), clip_grad_norm)
    if scaler is not None:
        scaler.step(engine.optimizer)
        scaler.update()
    else:
        engine.optimizer.step()
    return {key: value.detach().item() for key, value in losses.items() if value.numel() == 1}


class DetectionTrainStep:
    """One optimisation step on a batch of equally sized patches; returns the loss terms as floats.

    `clip_grad_norm` > 0 clips the global gradient norm (after unscaling under AMP); 0 disables it.
    """

    def __init__(self, clip_grad_norm: float = 0.0):
        self.clip_grad_norm = float(clip_grad_norm)

    def __call__(self, engine: Engine, batch) -> dict:
        device = engine.state.device
        samples = flatten_samples(batch)
        images = torch.stack([torch.as_tensor(s["image"]) for s in samples]).to(device,
                                                                                non_blocking=engine.non_blocking)
        targets = _targets(samples, device)
        return optimisation_step(engine, lambda: engine.network(images, targets), self.clip_grad_norm)


detection_train_step = DetectionTrainStep()


def detection_eval_step(engine: Engine, batch) -> dict:
    """Whole-volume detection (the detector's sliding-window inferer) on a batch of volumes.

    Returns `pred` (list of detection dicts, voxel boxes of the preprocessed grid), `label` (list of target
    dicts, empty when the data carries no boxes) and `image` (the preprocessed MetaTensors, whose affine and
    source filename the prediction writer needs).
    """
    device = engine.state.device
    samples = flatten_samples(batch)
    images = [s["image"].to(device) for s in samples]
    engine.network.eval()
    with torch.no_grad(), _autocast(engine, device):
        predictions = engine.network(images, use_inferer=True)
    predictions = [{k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in p.items()}
                   for p in predictions]
    has_targets = all("box" in s for s in samples)
    targets = _targets(samples, torch.device("cpu")) if has_targets else []
    return {"pred": predictions, "label": targets, "image": [s["image"] for s in samples]}
