"""Tests of meddet.inference.wbc: hand-computed merges, class separation, weights, the missing-prediction
correction, order independence, agreement with a plain sequential implementation, and a 10k-box run."""

from __future__ import annotations

import pytest
import torch
from monai.data.box_utils import box_iou

from meddet.inference.wbc import weighted_box_clustering

torch.set_num_threads(1)


def _reference_wbc(boxes, scores, weights, expected, iou_thresh):
    """Sequential weighted box clustering for one class, written as plainly as possible (N x N IoU)."""
    ious = box_iou(boxes, boxes)
    pool = torch.sort(scores, descending=True, stable=True).indices
    merged_boxes, merged_scores = [], []
    while pool.numel():
        seed = pool[0]
        members = pool[ious[seed, pool] > iou_thresh]
        match = ious[seed, members] * weights[members]
        missing = (expected[members].mean() - len(members)).clamp(min=0)
        merged_scores.append((match * scores[members]).sum() / (match.sum() + missing * match.mean()))
        box_weights = match * scores[members]
        merged_boxes.append((boxes[members] * box_weights[:, None]).sum(0) / box_weights.sum())
        pool = pool[ious[seed, pool] <= iou_thresh]
    return torch.stack(merged_boxes), torch.stack(merged_scores)


def _random_boxes(n, extent, generator):
    centres = torch.rand(n, 3, generator=generator, dtype=torch.float64) * extent
    sizes = 3 + torch.rand(n, 3, generator=generator, dtype=torch.float64) * 20
    return torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)


def test_two_clusters_and_an_isolated_box_hand_computed():
    a1, a2 = [0.0, 0, 0, 10, 10, 10], [1.0, 0, 0, 11, 10, 10]  # IoU 900 / 1100 = 9/11
    b1, b2 = [30.0, 30, 30, 40, 40, 40], [30.0, 30, 32, 40, 40, 42]  # IoU 800 / 1200 = 2/3
    c = [60.0, 0, 0, 64, 4, 4]
    boxes = torch.tensor([a2, b1, c, a1, b2], dtype=torch.float64)
    scores = torch.tensor([0.6, 0.8, 0.3, 0.9, 0.4], dtype=torch.float64)
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    out_boxes, out_scores, out_labels = weighted_box_clustering(boxes, scores, torch.zeros(5), weights)

    assert out_boxes.shape == (3, 6) and out_labels.tolist() == [0, 0, 0]
    # cluster a: match weights 1 (seed) and 9/11; box weights match * score
    ma, wa = 9 / 11, [0.9 * 1.0, 0.6 * 9 / 11]
    expected_a = [(wa[0] * p + wa[1] * q) / sum(wa) for p, q in zip(a1, a2)]
    score_a = (0.9 + 0.6 * ma) / (1 + ma)
    # cluster b: match weights 1 and 0.5 * 2/3
    mb, wb = 0.5 * 2 / 3, [0.8 * 1.0, 0.4 * 0.5 * 2 / 3]
    expected_b = [(wb[0] * p + wb[1] * q) / sum(wb) for p, q in zip(b1, b2)]
    score_b = (0.8 + 0.4 * mb) / (1 + mb)
    assert torch.allclose(out_scores, torch.tensor([score_a, score_b, 0.3], dtype=torch.float64))
    assert torch.allclose(out_boxes[0], torch.tensor(expected_a, dtype=torch.float64))
    assert torch.allclose(out_boxes[1], torch.tensor(expected_b, dtype=torch.float64))
    assert torch.allclose(out_boxes[2], torch.tensor(c, dtype=torch.float64))


def test_classes_are_kept_apart():
    box = [5.0, 5, 5, 15, 15, 15]
    boxes = torch.tensor([box, box, [6.0, 5, 5, 16, 15, 15]])
    out_boxes, out_scores, out_labels = weighted_box_clustering(
        boxes, torch.tensor([0.9, 0.7, 0.5]), torch.tensor([0, 1, 0]))
    assert out_labels.tolist() == [0, 1]
    assert torch.allclose(out_scores[1], torch.tensor(0.7))
    assert torch.allclose(out_boxes[1], torch.tensor(box))
    assert out_boxes[0, 0] > 5.0  # class 0 merged its two boxes, class 1's box did not pull it


def test_a_box_with_weight_zero_does_not_move_the_merged_box():
    seed, other = [10.0, 10, 10, 20, 20, 20], [12.0, 10, 10, 22, 20, 20]
    boxes, scores = torch.tensor([seed, other]), torch.tensor([0.9, 0.8])
    ignored, ignored_scores, _ = weighted_box_clustering(boxes, scores, torch.zeros(2), torch.tensor([1.0, 0.0]))
    counted, _, _ = weighted_box_clustering(boxes, scores, torch.zeros(2), torch.tensor([1.0, 1.0]))
    assert torch.allclose(ignored[0], torch.tensor(seed))
    assert torch.allclose(ignored_scores, torch.tensor([0.9]))
    assert counted[0, 0] > 10.5  # with weight 1 the same box does pull


def test_missing_predictions_lower_the_score():
    box = torch.tensor([[0.0, 0, 0, 8, 8, 8]])
    _, one_of_one, _ = weighted_box_clustering(box, torch.tensor([0.8]), torch.zeros(1), num_expected=1.0)
    _, one_of_eight, _ = weighted_box_clustering(box, torch.tensor([0.8]), torch.zeros(1), num_expected=8.0)
    assert torch.allclose(one_of_one, torch.tensor([0.8]))
    assert torch.allclose(one_of_eight, torch.tensor([0.1]))  # 0.8 * 1 / (1 + 7 * 1)


def test_score_threshold_and_iou_threshold():
    boxes = torch.tensor([[0.0, 0, 0, 10, 10, 10], [5.0, 0, 0, 15, 10, 10], [40.0, 40, 40, 44, 44, 44]])
    scores = torch.tensor([0.9, 0.8, 0.05])
    kept, kept_scores, _ = weighted_box_clustering(boxes, scores, torch.zeros(3), score_thresh=0.1)
    assert len(kept) == 1 and kept_scores[0] > 0.1
    # the first two overlap with IoU 1/3: one cluster at 0.1, two clusters at 0.5
    assert len(weighted_box_clustering(boxes, scores, torch.zeros(3), iou_thresh=0.5)[0]) == 3


def test_empty_input():
    out_boxes, out_scores, out_labels = weighted_box_clustering(torch.zeros(0, 6), torch.zeros(0), torch.zeros(0))
    assert out_boxes.shape == (0, 6) and out_scores.shape == (0,) and out_labels.shape == (0,)


def test_input_order_does_not_matter():
    generator = torch.Generator().manual_seed(3)
    boxes = _random_boxes(300, 60.0, generator)
    scores = torch.rand(300, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (300,), generator=generator)
    weights = 0.2 + torch.rand(300, generator=generator, dtype=torch.float64)
    first = weighted_box_clustering(boxes, scores, labels, weights, num_expected=4.0)
    permutation = torch.randperm(300, generator=generator)
    second = weighted_box_clustering(boxes[permutation], scores[permutation], labels[permutation],
                                     weights[permutation], num_expected=4.0)
    assert len(first[0]) < 300
    for a, b in zip(first, second):
        assert a.shape == b.shape and torch.allclose(a.double(), b.double())


def test_matches_sequential_reference_across_blocks():
    # more boxes than one block (512), so seeds found in earlier blocks must claim later boxes
    generator = torch.Generator().manual_seed(5)
    boxes = _random_boxes(1200, 80.0, generator)
    scores = torch.rand(1200, generator=generator, dtype=torch.float64)
    weights = 0.3 + torch.rand(1200, generator=generator, dtype=torch.float64)
    expected = torch.randint(1, 9, (1200,), generator=generator).double()
    ref_boxes, ref_scores = _reference_wbc(boxes, scores, weights, expected, 0.1)
    out_boxes, out_scores, _ = weighted_box_clustering(boxes, scores, torch.zeros(1200), weights,
                                                       num_expected=expected)
    order = torch.sort(ref_scores, descending=True, stable=True).indices
    assert out_boxes.shape == ref_boxes.shape
    assert torch.allclose(out_scores, ref_scores[order])
    assert torch.allclose(out_boxes, ref_boxes[order])


def test_ten_thousand_boxes_run():
    generator = torch.Generator().manual_seed(7)
    boxes = _random_boxes(10_000, 300.0, generator).float()
    scores = torch.rand(10_000, generator=generator)
    labels = torch.randint(0, 2, (10_000,), generator=generator)
    out_boxes, out_scores, out_labels = weighted_box_clustering(boxes, scores, labels, num_expected=8.0)
    assert 0 < len(out_boxes) < 10_000
    assert (out_boxes[:, 3:] > out_boxes[:, :3]).all()
    assert (out_scores[:-1] >= out_scores[1:]).all() and out_scores.max() <= 1.0
    assert set(out_labels.tolist()) == {0, 1}


def test_bad_input_raises():
    with pytest.raises(ValueError, match="boxes must have shape"):
        weighted_box_clustering(torch.zeros(3, 5), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="scores has 2 entries"):
        weighted_box_clustering(torch.zeros(3, 6), torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="max < min"):
        weighted_box_clustering(torch.tensor([[5.0, 0, 0, 1, 1, 1]]), torch.ones(1), torch.zeros(1))
