"""Tests of meddet.inference.plots: PNGs are written, readable, and sized by the number of panels."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
import torch

from meddet.inference import save_detection_png

torch.set_num_threads(1)


def _image():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 40, 30, 20, generator=generator)
    image[0, 10:16, 8:14, 5:9] += 5.0
    return image


def _detections(n):
    boxes = torch.tensor([[10.0, 8, 5, 16, 14, 9], [20.0, 5, 10, 26, 12, 15], [2.0, 2, 2, 6, 6, 6],
                          [30.0, 20, 12, 36, 28, 18]])[:n]
    return {"box": boxes, "label": torch.zeros(n, dtype=torch.long),
            "label_scores": torch.tensor([0.9, 0.6, 0.05, 0.4])[:n]}


def test_png_is_written_and_readable(tmp_path):
    path = save_detection_png(_image(), _detections(2), tmp_path / "sub" / "case.png",
                              ground_truth={"box": torch.tensor([[10.0, 8, 5, 16, 14, 9]])})
    assert path.endswith("case.png")
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert np.ptp(pixels[..., :3]) > 0.5  # an actual picture, not a blank canvas


def test_panel_count_follows_detections_and_score_min(tmp_path):
    one = matplotlib.image.imread(save_detection_png(_image(), _detections(1), tmp_path / "one.png"))
    # four detections, one under score_min: three panels in one row
    three = matplotlib.image.imread(save_detection_png(_image().numpy()[0], _detections(4), tmp_path / "three.png"))
    two_rows = matplotlib.image.imread(
        save_detection_png(_image(), _detections(4), tmp_path / "rows.png", max_panels=4, score_min=0.0))
    assert three.shape[1] > 2.5 * one.shape[1] and three.shape[0] == one.shape[0]
    assert two_rows.shape[0] > 1.8 * one.shape[0]


def test_no_detections_draws_the_middle_slice(tmp_path):
    empty = {"box": torch.zeros(0, 6), "label": torch.zeros(0, dtype=torch.long), "label_scores": torch.zeros(0)}
    path = save_detection_png(_image(), empty, tmp_path / "empty.png")
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 50 and np.ptp(pixels[..., :3]) > 0.5


def test_bad_image_raises(tmp_path):
    with pytest.raises(ValueError, match="image must be"):
        save_detection_png(torch.zeros(40, 30), _detections(1), tmp_path / "bad.png")


def test_objects_hits_misses_and_false_positives_get_their_panels(tmp_path):
    from meddet.inference.plots import _panels

    truth = np.array([[10.0, 8, 5, 16, 14, 9], [30.0, 20, 12, 36, 28, 18]])
    boxes = _detections(4)["box"].numpy().astype(np.float64)
    scores = np.array([0.9, 0.6, 0.05, 0.4])
    panels, summary = _panels(boxes, scores, truth, scores >= 0.5, depth=20, max_panels=6, iou_thresh=0.1)
    # object 1 found at 0.9; object 2 only by a detection under the operating threshold 0.5: missed;
    # the 0.6 detection matches nothing: a false positive
    assert summary == (1, 1, 1)
    assert [title for _, title in panels] == ["object 1: hit, score 0.90", "object 2: missed",
                                              "false positive, score 0.60"]
    assert [z for z, _ in panels] == [7, 15, 12]  # each object's and detection's centre slice
    path = save_detection_png(_image(), _detections(4), tmp_path / "case.png", ground_truth={"box": torch.tensor(truth)})
    assert matplotlib.image.imread(path).shape[1] > 2.5 * 320  # three panels side by side
