"""Freeze-then-unfreeze warm-up of a pre-trained encoder (an ablation option; the release recipe freezes nothing)."""

from __future__ import annotations

import logging
from typing import List

from ignite.engine import Engine, Events
from torch import nn

from meddet.networks.wrappers import unwrap, wrapper_chain

logger = logging.getLogger(__name__)


def _is_distributed(network: nn.Module) -> bool:
    return any(isinstance(m, nn.parallel.DistributedDataParallel) for m in wrapper_chain(network))


def _encoder(network: nn.Module) -> nn.Module:
    network = unwrap(network)  # DistributedDataParallel / DataParallel / torch.compile wrappers
    encoder = getattr(network, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"FreezeEncoder: {type(network).__name__} has no 'encoder' submodule to freeze")
    return encoder


class FreezeEncoder:
    """Keep `network.encoder` frozen for the first `unfreeze_iteration` iterations, then train it.

    Iterations 1..unfreeze_iteration (ignite counts from 1) run with `requires_grad=False` on every encoder
    parameter that was trainable; at the end of iteration `unfreeze_iteration` they become trainable again. The
    parameters stay in the optimizer throughout: frozen ones simply get no gradient, so the optimizer skips them
    (no momentum or weight-decay update either, with gradients reset to None as torch does by default).

    The state follows the engine's iteration counter, checked at STARTED and at every ITERATION_STARTED, so a run
    resumed past `unfreeze_iteration` trains the encoder whatever order the checkpoint loader and this handler
    were attached in. `unfreeze_iteration <= 0` never freezes.

    Under DistributedDataParallel, whose gradient reduction expects a gradient for every parameter that was trainable
    when it wrapped the model, `requires_grad` stays on: the frozen parameters are listed in the engine state's
    `frozen_parameters` and `meddet.engines.optimisation_step` drops their (reduced) gradients before the optimizer
    step, with the same effect on the weights; the encoder's backward pass is then still computed.

    Usage: `FreezeEncoder(network, 4000).attach(trainer)` (a MONAI bundle lists it among the train handlers).
    """

    def __init__(self, network: nn.Module, unfreeze_iteration: int):
        self.encoder = _encoder(network)
        self.distributed = _is_distributed(network)
        self.unfreeze_iteration = int(unfreeze_iteration)
        self._frozen: List[nn.Parameter] = []
        self._engine: Engine | None = None

    @property
    def frozen(self) -> bool:
        return bool(self._frozen)

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._on_iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration_completed)

    def _on_started(self, engine: Engine) -> None:
        self._apply(engine.state.iteration < self.unfreeze_iteration, engine.state.iteration)

    def _on_iteration_started(self, engine: Engine) -> None:
        # the counter was already advanced to the running iteration
        self._apply(engine.state.iteration <= self.unfreeze_iteration, engine.state.iteration)

    def _on_iteration_completed(self, engine: Engine) -> None:
        if engine.state.iteration >= self.unfreeze_iteration:
            self._apply(False, engine.state.iteration)

    def _apply(self, freeze: bool, iteration: int) -> None:
        if freeze and not self._frozen:
            self._frozen = [p for p in self.encoder.parameters() if p.requires_grad]
            if self.distributed:
                self._engine.state.frozen_parameters = tuple(self._frozen)
            for parameter in [] if self.distributed else self._frozen:
                parameter.requires_grad_(False)
            logger.info(
                "encoder frozen (%d tensors) at iteration %d until iteration %d", len(self._frozen), iteration,
                self.unfreeze_iteration,
            )
        elif not freeze and self._frozen:
            if self.distributed:
                self._engine.state.frozen_parameters = ()
            for parameter in [] if self.distributed else self._frozen:
                parameter.requires_grad_(True)
            logger.info("encoder unfrozen (%d tensors) after iteration %d", len(self._frozen), iteration)
            self._frozen = []
