"""The pre-training iteration for MONAI's SupervisedTrainer (`iteration_update`)."""

from __future__ import annotations

from ignite.engine import Engine

from meddet.engines.steps import flatten_samples, optimisation_step


class PretrainingStep:
    """One optimisation step of `objective` (`meddet.pretraining.objectives`) on a batch of patches, with the
    detectors' AMP / non-finite check / gradient clipping (`clip_grad_norm` > 0; nnssl: 12 for MAE, 0.1 for
    SimCLR). Returns the objective's scalar outputs (`loss`, and e.g. `accuracy`) as floats."""

    def __init__(self, objective, clip_grad_norm: float = 0.0):
        self.objective = objective
        self.clip_grad_norm = float(clip_grad_norm)

    def __call__(self, engine: Engine, batch) -> dict:
        samples = flatten_samples(batch)
        return optimisation_step(engine, lambda: self.objective(engine.network, samples, engine.state.device),
                                 self.clip_grad_norm)
