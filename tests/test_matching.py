"""Tests for meddet.detectors.matching: Hungarian assignment and the Deformable DETR matching cost."""

import itertools
import math

import pytest
import torch

from meddet.detectors import hungarian_match, match_cost

torch.set_num_threads(1)


def brute_force_minimum(cost: torch.Tensor) -> float:
    """Smallest total cost of a one-to-one assignment of min(Q, G) pairs, by enumeration."""
    queries, targets = cost.shape
    if queries >= targets:
        return min(sum(float(cost[q, g]) for g, q in enumerate(chosen))
                   for chosen in itertools.permutations(range(queries), targets))
    return min(sum(float(cost[q, g]) for q, g in enumerate(chosen))
               for chosen in itertools.permutations(range(targets), queries))


@pytest.mark.parametrize("shape", [(5, 3), (4, 4), (3, 5), (6, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hungarian_match_is_optimal_and_one_to_one(shape, seed):
    cost = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 10 - 3
    query_idx, gt_idx = hungarian_match(cost)
    assert query_idx.dtype == gt_idx.dtype == torch.long
    assert len(query_idx) == len(gt_idx) == min(shape)
    assert len(set(query_idx.tolist())) == len(query_idx) and len(set(gt_idx.tolist())) == len(gt_idx)
    assert math.isclose(float(cost[query_idx, gt_idx].sum()), brute_force_minimum(cost), abs_tol=1e-5)


def test_hungarian_match_edge_cases():
    query_idx, gt_idx = hungarian_match(torch.zeros(7, 0))
    assert query_idx.numel() == 0 and gt_idx.numel() == 0
    with pytest.raises(ValueError, match="NaN or infinite"):
        hungarian_match(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"\[Q, G\]"):
        hungarian_match(torch.zeros(3))


def test_match_cost_by_hand():
    # query 0: p = 0.5, box inside the target with half its volume; query 1: p = 0.75, box disjoint from it
    logits = torch.tensor([[0.0], [math.log(3.0)]])
    pred_boxes = torch.tensor([[0.5, 0.5, 0.5, 0.2, 0.2, 0.2], [0.2, 0.5, 0.5, 0.2, 0.2, 0.2]])
    gt_boxes = torch.tensor([[0.5, 0.5, 0.5, 0.2, 0.2, 0.4]])
    gt_labels = torch.tensor([0])
    cost = match_cost(logits, pred_boxes, gt_labels, gt_boxes)  # weights 2 / 5 / 2, alpha 0.75, gamma 1

    def class_cost(p):
        return 0.75 * (1 - p) * -math.log(p) - 0.25 * p * -math.log(1 - p)

    # query 0: L1 = 0.2 (depth); IoU = 0.008 / 0.016 = 0.5, enclosure = target -> GIoU 0.5
    expected_0 = 5 * 0.2 + 2 * class_cost(0.5) - 2 * 0.5
    # query 1: L1 = 0.3 (x) + 0.2 (depth); no overlap, enclosure 0.5 x 0.2 x 0.4 = 0.04, union 0.024
    expected_1 = 5 * 0.5 + 2 * class_cost(0.75) - 2 * (0.0 - (0.04 - 0.024) / 0.04)
    assert cost.shape == (2, 1)
    assert torch.allclose(cost[:, 0], torch.tensor([expected_0, expected_1]), atol=1e-5)

    # GIoU does not depend on the (anisotropic) scale at which it is computed
    scaled = match_cost(logits, pred_boxes, gt_labels, gt_boxes, image_size=(64, 32, 48))
    assert torch.allclose(scaled, cost, atol=1e-5)


def test_match_cost_uses_the_target_class_and_weights():
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    boxes = torch.tensor([[0.3, 0.3, 0.3, 0.1, 0.1, 0.1], [0.7, 0.7, 0.7, 0.1, 0.1, 0.1]])
    labels = torch.tensor([1, 0])
    class_only = match_cost(logits, boxes, labels, boxes.flip(0), cost_bbox=0.0, cost_giou=0.0)
    # query 0 is confident in class 0: cheap for target 1 (class 0), expensive for target 0 (class 1)
    assert class_only[0, 1] < 0 < class_only[0, 0]
    assert class_only[1, 0] < 0 < class_only[1, 1]
    box_only = match_cost(logits, boxes, labels, boxes.flip(0), cost_class=0.0, cost_giou=0.0)
    assert torch.allclose(box_only, 5 * torch.tensor([[1.2, 0.0], [0.0, 1.2]]), atol=1e-6)
