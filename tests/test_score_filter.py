"""SelectDetectionsByScored: the viewer's score threshold on world-coordinate detections."""

from __future__ import annotations

import pytest
import torch

from meddet.data.score_filter import SelectDetectionsByScored


def _detections():
    boxes = torch.arange(18, dtype=torch.float32).reshape(3, 6) + 1.0
    return {"box": boxes, "label": torch.tensor([0, 1, 0]), "label_scores": torch.tensor([0.9, 0.2, 0.5]),
            "image": "kept as is"}


def test_keeps_rows_at_or_above_the_threshold_in_all_three_keys():
    data = _detections()
    out = SelectDetectionsByScored(score_thresh=0.5)(data)
    assert torch.equal(out["box"], data["box"][[0, 2]])
    assert out["label"].tolist() == [0, 0]
    assert out["label_scores"].tolist() == pytest.approx([0.9, 0.5])
    assert out["image"] == "kept as is"
    assert len(data["box"]) == 3  # the input dict is not modified


def test_zero_threshold_keeps_everything_and_a_high_one_nothing():
    assert len(SelectDetectionsByScored(0.0)(_detections())["box"]) == 3
    out = SelectDetectionsByScored(0.95)(_detections())
    assert out["box"].shape == (0, 6) and out["label"].shape == (0,) and out["label_scores"].shape == (0,)


def test_custom_keys_and_clear_errors():
    data = {"pred": torch.zeros(2, 6), "cls": torch.tensor([0, 0]), "p": torch.tensor([0.1, 0.7])}
    out = SelectDetectionsByScored(0.5, box_key="pred", label_key="cls", score_key="p")(data)
    assert out["p"].tolist() == pytest.approx([0.7])
    with pytest.raises(KeyError, match="label_scores"):
        SelectDetectionsByScored(0.5)({"box": torch.zeros(1, 6), "label": torch.zeros(1)})
    with pytest.raises(ValueError, match="2 boxes, 1 labels and 2 scores"):
        SelectDetectionsByScored(0.5)({"box": torch.zeros(2, 6), "label": torch.zeros(1),
                                       "label_scores": torch.zeros(2)})
