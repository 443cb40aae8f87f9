"""One version grammar for the package, the bundles and the index; handlers chosen per rank by kind."""

from __future__ import annotations

import ignite.distributed as idist
import pytest
import torch
from ignite.handlers import ProgressBar
from monai.handlers import CheckpointSaver, StatsHandler, TensorBoardStatsHandler

import meddet
from meddet.engines import handlers_for_this_rank


def test_versions_compare_as_numbers_and_odd_ones_are_refused():
    assert meddet.version_key("0.10.0") > meddet.version_key("0.9.9")
    assert sorted(["0.4.0", "0.10.0", "0.3.1"], key=meddet.version_key) == ["0.3.1", "0.4.0", "0.10.0"]
    for odd in ("1.0-rc1", "", "v1.0", "1..0"):
        with pytest.raises(ValueError, match="dotted number"):
            meddet.version_key(odd)


def test_require_version_names_both_versions(monkeypatch):
    assert meddet.require_version(meddet.__version__)
    monkeypatch.setattr(meddet, "__version__", "0.4.0+local")  # a source checkout's local part is ignored
    assert meddet.require_version("0.4.0")
    with pytest.raises(RuntimeError, match=r"needs meddet >= 0\.10\.0, but meddet 0\.4\.0\+local is installed"):
        meddet.require_version("0.10.0")


def test_logging_handlers_attach_on_rank_zero_only(monkeypatch, tmp_path):
    saver = CheckpointSaver(save_dir=str(tmp_path), save_dict={"model": torch.nn.Linear(1, 1)})
    stats, board, bar = StatsHandler(), TensorBoardStatsHandler(log_dir=str(tmp_path)), ProgressBar()
    handlers = [saver, stats, board, bar]
    monkeypatch.setattr(idist, "get_rank", lambda: 0)
    assert handlers_for_this_rank(handlers) == handlers
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    assert handlers_for_this_rank(handlers) == [saver]
