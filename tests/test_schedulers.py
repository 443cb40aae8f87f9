import pytest
import torch

from meddet.engines import WarmupPoly, parameter_groups, warmup_poly_scheduler


def _lrs(total, warmup, base=0.01, start=1e-6):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=base)
    scheduler = warmup_poly_scheduler(optimizer, total, warmup, warmup_start_lr=start)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_starts_at_start_lr_and_reaches_base_lr():
    lrs = _lrs(total=100, warmup=10)
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[5] == pytest.approx(1e-6 + (0.01 - 1e-6) * 0.5)
    assert lrs[10] == pytest.approx(0.01)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:11]))


def test_poly_decay_after_warmup():
    lrs = _lrs(total=100, warmup=10)
    assert lrs[55] == pytest.approx(0.01 * (1 - 45 / 90) ** 0.9)
    assert all(b < a for a, b in zip(lrs[10:99], lrs[11:100]))


def test_no_warmup_is_pure_poly():
    assert _lrs(total=50, warmup=0)[0] == pytest.approx(0.01)


def test_invalid_schedule_is_refused():
    with pytest.raises(ValueError, match="warmup_iterations"):
        WarmupPoly(0.01, total_iterations=10, warmup_iterations=-1)
    with pytest.raises(ValueError, match="total_iterations"):
        WarmupPoly(0.01, total_iterations=0)


def test_warmup_longer_than_the_run_spans_the_whole_run(caplog):
    with caplog.at_level("WARNING"):
        schedule = WarmupPoly(0.01, total_iterations=10, warmup_iterations=20)
    assert schedule.warmup_iterations == 10 and "exceeds" in caplog.text
    assert schedule(5) == pytest.approx(1e-4 + (1 - 1e-4) * 0.5)


def test_scheduler_state_round_trips_through_weights_only_load(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = warmup_poly_scheduler(optimizer, 100, 10)
    for _ in range(17):
        optimizer.step()
        scheduler.step()
    torch.save({"s": scheduler.state_dict(), "o": optimizer.state_dict()}, tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    model2 = torch.nn.Linear(2, 2)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    scheduler2 = warmup_poly_scheduler(optimizer2, 100, 10)
    optimizer2.load_state_dict(state["o"])
    scheduler2.load_state_dict(state["s"])
    optimizer.step(), scheduler.step(), optimizer2.step(), scheduler2.step()
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_parameter_groups_skip_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.InstanceNorm3d(4, affine=True))
    decay, no_decay = parameter_groups(model, 3e-5)
    assert decay["weight_decay"] == 3e-5 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 1, 3, 3, 3])]
    assert len(no_decay["params"]) == 3  # conv bias, norm weight, norm bias
