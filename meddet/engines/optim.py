"""Optimizer parameter groups of the recipes."""

from __future__ import annotations

import torch


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on conv/linear weights, none on biases, norm parameters and per-level scales
    (nnDetection's convention: decaying a norm's affine parameters or a scalar scale only shrinks them)."""
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
