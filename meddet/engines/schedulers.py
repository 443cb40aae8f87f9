"""Per-iteration learning-rate schedules of the fine-tuning recipes (DESIGN §4)."""

from __future__ import annotations

import logging

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupPoly:
    """lr factor at iteration t: linear warm-up from `warmup_start_lr` to the base lr over `warmup_iterations`,
    then polynomial decay (1 - progress) ** exponent to 0 at `total_iterations`.

    A class rather than a closure so that the scheduler's state is plain data (checkpoint + resume).
    """

    def __init__(self, base_lr: float, total_iterations: int, warmup_iterations: int = 0,
                 warmup_start_lr: float = 1e-6, exponent: float = 0.9):
        if total_iterations <= 0:
            raise ValueError(f"total_iterations must be positive, got {total_iterations}")
        if warmup_iterations < 0:
            raise ValueError(f"warmup_iterations must be >= 0, got {warmup_iterations}")
        if warmup_iterations > total_iterations:
            # a shortened run (a quick test, a smoke preset with fewer epochs) keeps its warm-up proportionate
            logging.getLogger(__name__).warning(
                "warmup_iterations %d exceeds the %d iterations of the run; warming up over the whole run",
                warmup_iterations, total_iterations)
            warmup_iterations = total_iterations
        self.base_lr = float(base_lr)
        self.total_iterations = int(total_iterations)
        self.warmup_iterations = int(warmup_iterations)
        self.warmup_start_lr = float(warmup_start_lr)
        self.exponent = float(exponent)

    def __call__(self, iteration: int) -> float:
        if iteration < self.warmup_iterations:
            start = min(self.warmup_start_lr / self.base_lr, 1.0)
            return start + (1.0 - start) * iteration / self.warmup_iterations
        decay_span = max(self.total_iterations - self.warmup_iterations, 1)
        progress = min((iteration - self.warmup_iterations) / decay_span, 1.0)
        return (1.0 - progress) ** self.exponent


def warmup_poly_scheduler(optimizer: Optimizer, total_iterations: int, warmup_iterations: int = 0,
                          warmup_start_lr: float = 1e-6, exponent: float = 0.9) -> LambdaLR:
    """LambdaLR stepped once per iteration (attach with `LrScheduleHandler(epoch_level=False)`)."""
    factors = [WarmupPoly(group["lr"], total_iterations, warmup_iterations, warmup_start_lr, exponent)
               for group in optimizer.param_groups]
    return LambdaLR(optimizer, lr_lambda=factors)
