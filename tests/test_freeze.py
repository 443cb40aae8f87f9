"""Tests for meddet.engines.freeze.FreezeEncoder."""

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from meddet.engines.freeze import FreezeEncoder


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1))
        self.head = nn.Conv3d(4, 1, 1)

    def forward(self, x):
        return self.head(self.encoder(x))


def training_run(network, optimizer, records):
    """An engine whose step records, per iteration, whether the encoder and the head got gradients and whether
    the encoder weights changed in the optimizer step."""
    image = torch.randn(1, 1, 6, 6, 6)
    encoder_weight = network.encoder[0].weight

    def step(engine, _):
        optimizer.zero_grad()
        network(image).square().mean().backward()
        before = encoder_weight.detach().clone()
        optimizer.step()
        records[engine.state.iteration] = (
            encoder_weight.grad is not None,
            network.head.weight.grad is not None,
            not torch.equal(before, encoder_weight.detach()),
        )

    return Engine(step)


def make_optimizer(network):
    return torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)


def test_encoder_frozen_until_the_unfreeze_iteration_then_trained():
    torch.manual_seed(0)
    network = Toy()
    network.encoder[2].bias.requires_grad_(False)  # a parameter frozen by choice stays frozen
    optimizer = make_optimizer(network)
    groups_before = [[id(p) for p in group["params"]] for group in optimizer.param_groups]
    records = {}
    engine = training_run(network, optimizer, records)
    FreezeEncoder(network, unfreeze_iteration=3).attach(engine)
    engine.run(range(5), max_epochs=1)

    assert [records[i][0] for i in range(1, 6)] == [False, False, False, True, True]
    assert all(records[i][1] for i in range(1, 6))  # the head trains throughout
    assert [records[i][2] for i in range(1, 6)] == [False, False, False, True, True]  # no decay/momentum either
    assert [[id(p) for p in group["params"]] for group in optimizer.param_groups] == groups_before
    assert network.encoder[0].weight.requires_grad and not network.encoder[2].bias.requires_grad


def test_wrapped_network_and_zero_unfreeze_iteration():
    network = Toy()
    records = {}
    engine = training_run(network, make_optimizer(network), records)
    FreezeEncoder(nn.parallel.DataParallel(network), unfreeze_iteration=0).attach(engine)
    engine.run(range(2), max_epochs=1)
    assert [records[i][0] for i in (1, 2)] == [True, True]


@pytest.mark.parametrize("loader_first", [True, False])
@pytest.mark.parametrize("resume_at, frozen", [(10, []), (1, [2, 3])])
def test_resume_follows_the_iteration_counter(loader_first, resume_at, frozen):
    """A checkpoint loader that restores the counter at STARTED, attached before or after the handler."""
    network = Toy()
    records = {}
    engine = training_run(network, make_optimizer(network), records)
    freeze = FreezeEncoder(network, unfreeze_iteration=3)

    def restore(engine):
        engine.state.iteration = resume_at
        engine.state.epoch = resume_at // 5

    if loader_first:
        engine.add_event_handler(Events.STARTED, restore)
        freeze.attach(engine)
    else:
        freeze.attach(engine)
        engine.add_event_handler(Events.STARTED, restore)
    engine.run(range(5), max_epochs=3)

    ran = sorted(records)
    assert ran[0] == resume_at + 1 and ran[-1] == 15
    assert [i for i in ran if not records[i][0]] == frozen
    assert not freeze.frozen and network.encoder[0].weight.requires_grad


def test_network_without_encoder_is_rejected():
    with pytest.raises(TypeError, match="encoder"):
        FreezeEncoder(nn.Conv3d(1, 1, 1), unfreeze_iteration=5)


def _optimisation_engine(network, optimizer, records):
    """An engine running meddet's optimisation step (as the bundles' trainers do) on a fixed image."""
    from meddet.engines import optimisation_step

    image = torch.randn(1, 1, 6, 6, 6)
    encoder_weight = network.module.encoder[0].weight

    def step(engine, _):
        before = encoder_weight.detach().clone()
        optimisation_step(engine, lambda: {"loss": network(image).square().mean()})
        records[engine.state.iteration] = not torch.equal(before, encoder_weight.detach())

    engine = Engine(step)
    engine.network, engine.optimizer, engine.scaler, engine.amp = network, optimizer, None, False
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "device", torch.device("cpu")))
    return engine


def test_freezing_under_distributed_data_parallel(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        network = nn.parallel.DistributedDataParallel(Toy())
        records = {}
        engine = _optimisation_engine(network, make_optimizer(network), records)
        freeze = FreezeEncoder(network, unfreeze_iteration=2)
        freeze.attach(engine)
        engine.run(range(4), max_epochs=1)  # toggling requires_grad under DDP would fail in its gradient reduction
        assert freeze.distributed
        assert [records[i] for i in range(1, 5)] == [False, False, True, True]
        assert network.module.encoder[0].weight.requires_grad
    finally:
        dist.destroy_process_group()


def test_non_finite_loss_is_an_error_in_fp32_and_a_skipped_step_under_amp():
    from meddet.engines import steps

    network = Toy()

    def engine_with(values, scaler):
        values = iter(values)
        engine = Engine(lambda e, _: steps.optimisation_step(
            e, lambda: {"loss": network(torch.randn(1, 1, 6, 6, 6)).mean() * 0 + next(values)}))
        engine.network, engine.optimizer, engine.scaler, engine.amp = network, make_optimizer(network), scaler, False
        engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "device", torch.device("cpu")))
        return engine

    with pytest.raises(FloatingPointError, match="non-finite training loss at iteration 1"):
        engine_with([float("inf")], None).run(range(1), max_epochs=1)

    # under AMP: skipped and counted, the count of consecutive ones reset by a finite loss
    engine = engine_with([float("inf")] * 3 + [1.0] + [float("nan")] * steps.MAX_NONFINITE_STEPS,
                         torch.amp.GradScaler("cpu"))
    with pytest.raises(FloatingPointError, match=f"{steps.MAX_NONFINITE_STEPS} non-finite losses in a row"):
        engine.run(range(100), max_epochs=1)
    assert engine.state.iteration == 4 + steps.MAX_NONFINITE_STEPS
    assert engine.state.skipped_steps == 3 + steps.MAX_NONFINITE_STEPS
