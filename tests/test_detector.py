import math

import numpy as np
import pytest
import torch
from monai.apps.detection.utils.box_selector import BoxSelector
from monai.data.box_utils import batched_nms as monai_batched_nms
from monai.data.box_utils import box_iou, non_max_suppression
from torch import nn

from meddet.detectors import (
    RetinaUNetDetector,
    batched_nms,
    ellipsoid_segmentation_target,
    plan_anchor_shapes,
    sigmoid_focal_loss,
)
from meddet.networks import retina_unet_resenc

torch.set_num_threads(1)

BOX = torch.tensor([[9.0, 11.0, 7.0, 21.0, 19.0, 17.0]])  # 12 x 8 x 10 voxels inside a 32^3 patch


class TinyRetinaNet(nn.Module):
    """Small conv net returning the Retina U-Net output dict (levels at strides 4 and 8)."""

    detection_strides = (4, 8)

    def __init__(self, num_anchors, num_classes=1, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ReLU())
        self.down = nn.ModuleList(
            [
                nn.Sequential(nn.Conv3d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                              nn.Conv3d(width, width, 3, padding=1), nn.ReLU())
                for _ in range(3)
            ]
        )
        self.cls = nn.Conv3d(width, num_anchors * num_classes, 3, padding=1)
        self.reg = nn.Conv3d(width, num_anchors * 6, 3, padding=1)
        self.seg = nn.Conv3d(width, 2, 1)
        nn.init.constant_(self.cls.bias, -math.log(99))  # prior probability 0.01
        nn.init.normal_(self.reg.weight, std=0.01)
        nn.init.zeros_(self.reg.bias)

    def forward(self, x):
        full = self.stem(x)
        features, levels = full, []
        for index, block in enumerate(self.down):
            features = block(features)
            if index >= 1:
                levels.append(features)
        return {
            "classification": [self.cls(f) for f in levels],
            "box_regression": [self.reg(f) for f in levels],
            "segmentation": self.seg(full),
        }


class ScriptedNetwork(nn.Module):
    """Returns fixed head outputs (set per test) for a 32^3 patch; strides 4 and 8."""

    detection_strides = (4, 8)

    def __init__(self, num_anchors, num_classes):
        super().__init__()
        self.cls = [torch.full((1, num_anchors * num_classes, 8, 8, 8), -10.0),
                    torch.full((1, num_anchors * num_classes, 4, 4, 4), -10.0)]
        self.reg = [torch.zeros(1, num_anchors * 6, 8, 8, 8), torch.zeros(1, num_anchors * 6, 4, 4, 4)]

    def forward(self, x):
        batch = x.shape[0]
        return {
            "classification": [c.expand(batch, *c.shape[1:]) for c in self.cls],
            "box_regression": [r.expand(batch, *r.shape[1:]) for r in self.reg],
            "segmentation": torch.zeros(batch, 2, *x.shape[2:]),
        }


@pytest.fixture(scope="module")
def anchor_shapes():
    sizes = np.array([[12, 8, 10], [10, 10, 8], [14, 9, 12], [6, 6, 4], [20, 16, 14]], dtype=float)
    return plan_anchor_shapes(sizes, level_scales=(1, 2))


def _patch_with_box(batch=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(batch, 1, 32, 32, 32, generator=generator)
    images[:, 0, 9:21, 11:19, 7:17] += 2.0
    return images


def _targets(batch=1, empty=()):
    return [
        {"box": torch.zeros(0, 6), "label": torch.zeros(0, dtype=torch.long)}
        if i in empty
        else {"box": BOX.clone(), "label": torch.tensor([0])}
        for i in range(batch)
    ]


@pytest.mark.parametrize("cls_loss", ["focal", "bce_hnm"])
@pytest.mark.parametrize("reg_loss", ["l1", "giou"])
def test_training_step_gives_finite_losses_and_gradients(anchor_shapes, cls_loss, reg_loss):
    torch.manual_seed(0)
    network = TinyRetinaNet(len(anchor_shapes))
    detector = RetinaUNetDetector(network, anchor_shapes, cls_loss=cls_loss, reg_loss=reg_loss).train()
    losses = detector(_patch_with_box(batch=2), _targets(batch=2, empty=(1,)))
    assert set(losses) == {"classification", "box_regression", "segmentation", "loss"}
    for value in losses.values():
        assert value.ndim == 0 and torch.isfinite(value)
    assert losses["classification"] > 0 and losses["box_regression"] > 0 and losses["segmentation"] > 0
    expected = (
        detector.cls_loss_weight * losses["classification"]
        + detector.reg_loss_weight * losses["box_regression"]
        + detector.seg_loss_weight * losses["segmentation"]
    )
    assert torch.allclose(losses["loss"], expected)
    losses["loss"].backward()
    for name in ("cls.weight", "reg.weight", "seg.weight", "stem.0.weight"):
        grad = dict(network.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_default_classification_weights_follow_the_chosen_loss(anchor_shapes):
    network = TinyRetinaNet(len(anchor_shapes))
    assert RetinaUNetDetector(network, anchor_shapes, cls_loss="focal").cls_loss_weight == pytest.approx(0.3)
    assert RetinaUNetDetector(network, anchor_shapes, cls_loss="bce_hnm").cls_loss_weight == pytest.approx(1.0)
    assert RetinaUNetDetector(network, anchor_shapes, cls_loss_weight=2.0).cls_loss_weight == pytest.approx(2.0)


@pytest.mark.parametrize("cls_loss", ["focal", "bce_hnm"])
def test_negative_patch_gives_zero_regression_loss(anchor_shapes, cls_loss):
    torch.manual_seed(0)
    network = TinyRetinaNet(len(anchor_shapes))
    detector = RetinaUNetDetector(network, anchor_shapes, cls_loss=cls_loss).train()
    losses = detector(_patch_with_box(batch=2), _targets(batch=2, empty=(0, 1)))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["box_regression"].item() == 0.0
    assert losses["classification"] > 0
    losses["loss"].backward()  # the zero regression term keeps the graph intact
    assert network.reg.weight.grad is not None and torch.isfinite(network.reg.weight.grad).all()


def test_overfitting_one_patch_recovers_its_box(anchor_shapes):
    """Matching, encoding and decoding agree: training on one patch makes the top detection its box."""
    torch.manual_seed(0)
    network = TinyRetinaNet(len(anchor_shapes))
    detector = RetinaUNetDetector(network, anchor_shapes)
    images, targets = _patch_with_box(), _targets()
    optimizer = torch.optim.Adam(detector.parameters(), lr=3e-3)
    detector.train()
    for _ in range(150):
        losses = detector(images, targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    detector.eval()
    detections = detector(images)[0]
    assert len(detections["box"]) >= 1
    assert detections["label"][0] == 0
    assert box_iou(detections["box"][:1], BOX).item() > 0.5


def test_overfitting_with_the_tiny_resenc_retina_unet(anchor_shapes):
    """The same chain with the real network (4-stage ResEnc, detection levels at strides 4 and 8)."""
    torch.manual_seed(0)
    network = retina_unet_resenc(
        num_anchors=len(anchor_shapes),
        features_per_stage=(8, 16, 32, 64),
        strides=(1, 2, 2, 2),
        blocks_per_stage=(1, 1, 1, 1),
        fpn_channels=16,
        detection_levels=(2, 3),
    )
    detector = RetinaUNetDetector(network, anchor_shapes)
    images, targets = _patch_with_box(), _targets()
    optimizer = torch.optim.Adam(detector.parameters(), lr=3e-3)
    detector.train()
    for _ in range(30):
        losses = detector(images, targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    detector.eval()
    detections = detector(images)[0]
    assert len(detections["box"]) >= 1
    assert box_iou(detections["box"][:1], BOX).item() > 0.5


def test_predict_patches_decodes_anchor_major_layout_in_patch_coordinates():
    shapes = [[4, 4, 4], [6, 4, 2], [2, 6, 4]]
    num_anchors, num_classes = len(shapes), 2
    network = ScriptedNetwork(num_anchors, num_classes)
    # level 0 (stride 4): position (2, 3, 1), anchor 1, class 1, shifted by half a width and twice as wide
    network.cls[0][0, 1 * num_classes + 1, 2, 3, 1] = 10.0
    network.reg[0][0, 1 * 6 + 0, 2, 3, 1] = 0.5
    network.reg[0][0, 1 * 6 + 3, 2, 3, 1] = math.log(2.0)
    # level 1 (stride 8, anchors twice as large): position (1, 1, 2), anchor 2, class 0, no offset
    network.cls[1][0, 2 * num_classes + 0, 1, 1, 2] = 5.0
    detector = RetinaUNetDetector(network, shapes, num_classes=num_classes).eval()

    detections = detector(torch.zeros(2, 1, 32, 32, 32))
    assert len(detections) == 2
    first = detections[0]
    assert first["box"].dtype == torch.float32 and first["label"].dtype == torch.long
    assert first["label"].tolist() == [1, 0]
    assert torch.allclose(first["label_scores"], torch.sigmoid(torch.tensor([10.0, 5.0])))
    centre = torch.tensor([2 * 4 + 2 + 0.5 * 6, 3 * 4 + 2, 1 * 4 + 2])
    size = torch.tensor([12.0, 4.0, 2.0])
    assert torch.allclose(first["box"][0], torch.cat([centre - size / 2, centre + size / 2]), atol=1e-5)
    centre = torch.tensor([1 * 8 + 4, 1 * 8 + 4, 2 * 8 + 4], dtype=torch.float32)
    size = torch.tensor([4.0, 12.0, 8.0])
    assert torch.allclose(first["box"][1], torch.cat([centre - size / 2, centre + size / 2]), atol=1e-5)
    for key in first:
        assert torch.equal(first[key], detections[1][key])


def test_predict_patches_matches_monai_box_selector(anchor_shapes):
    """Same detections as MONAI's BoxSelector (which decodes every anchor and runs its own NMS)."""
    num_classes = 2
    network = ScriptedNetwork(len(anchor_shapes), num_classes)
    generator = torch.Generator().manual_seed(3)
    for level in range(2):
        network.cls[level] = torch.randn(network.cls[level].shape, generator=generator) - 1.0
        network.reg[level] = 0.2 * torch.randn(network.reg[level].shape, generator=generator)
    settings = dict(score_thresh=0.1, topk_candidates_per_level=300, nms_thresh=0.4, detections_per_patch=50)
    detector = RetinaUNetDetector(network, anchor_shapes, num_classes=num_classes, **settings).eval()
    images = torch.zeros(1, 1, 32, 32, 32)
    ours = detector(images)[0]

    logits, deltas, anchors = detector._flatten_outputs(network(images), images)
    selector = BoxSelector(
        apply_sigmoid=True,
        score_thresh=settings["score_thresh"],
        topk_candidates_per_level=settings["topk_candidates_per_level"],
        nms_thresh=settings["nms_thresh"],
        detections_per_img=settings["detections_per_patch"],
    )
    decoded = [detector.box_coder.decode_single(d[0], a) for d, a in zip(deltas, anchors)]
    boxes, scores, labels = selector.select_boxes_per_image(decoded, [x[0] for x in logits], (32, 32, 32))
    assert len(ours["box"]) == len(boxes) > 10
    assert torch.allclose(ours["box"], boxes, atol=1e-5)
    assert torch.allclose(ours["label_scores"], scores)
    assert torch.equal(ours["label"], labels)


def test_predict_patches_clips_to_the_patch_and_limits_the_count(anchor_shapes):
    torch.manual_seed(0)
    network = TinyRetinaNet(len(anchor_shapes))
    nn.init.constant_(network.cls.bias, 0.0)  # every anchor scores about 0.5: many candidates
    nn.init.normal_(network.reg.weight, std=0.1)
    detector = RetinaUNetDetector(network, anchor_shapes, detections_per_patch=20, nms_thresh=0.3).eval()
    patches = list(_patch_with_box(batch=2))  # a list of [C, X, Y, Z] is batched
    detections = detector(patches)
    assert len(detections) == 2
    for det in detections:
        assert set(det) == {"box", "label", "label_scores"}
        assert 0 < len(det["box"]) <= 20
        assert det["box"].shape == (len(det["label"]), 6) and det["label_scores"].shape == det["label"].shape
        assert (det["box"][:, :3] >= 0).all() and (det["box"][:, 3:] <= 32).all()
        assert (det["box"][:, 3:] > det["box"][:, :3]).all()
        assert (det["label_scores"] > detector.candidate_selector.score_thresh).all()
        assert (det["label_scores"][:-1] >= det["label_scores"][1:]).all()
        iou = box_iou(det["box"], det["box"]) - torch.eye(len(det["box"]))
        assert iou.max() <= 0.3 + 1e-6


def test_inferer_is_used_on_request_and_required(anchor_shapes):
    network = TinyRetinaNet(len(anchor_shapes))
    detector = RetinaUNetDetector(network, anchor_shapes).eval()
    with pytest.raises(RuntimeError, match="inferer"):
        detector(torch.zeros(1, 1, 32, 32, 32), use_inferer=True)

    calls = []

    def inferer(images, predict_fn):
        calls.append(tuple(images.shape))
        return [{"box": torch.zeros(0, 6), "label": torch.zeros(0, dtype=torch.long),
                 "label_scores": torch.zeros(0)} for _ in range(images.shape[0])]

    detector.set_inferer(inferer)
    assert len(detector(torch.zeros(2, 1, 32, 32, 32), use_inferer=True)) == 2
    # images of different sizes in a list go through the inferer one at a time
    results = detector([torch.zeros(1, 40, 32, 32), torch.zeros(1, 32, 48, 32)], use_inferer=True)
    assert len(results) == 2
    assert len(detector(torch.zeros(1, 24, 32, 40), use_inferer=True)) == 1  # one unbatched image
    assert calls == [(2, 1, 32, 32, 32), (1, 1, 40, 32, 32), (1, 1, 32, 48, 32), (1, 1, 24, 32, 40)]


def test_clear_errors_for_bad_inputs(anchor_shapes):
    network = TinyRetinaNet(len(anchor_shapes))
    detector = RetinaUNetDetector(network, anchor_shapes).train()
    with pytest.raises(ValueError, match="targets"):
        detector(torch.zeros(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="one shape"):
        detector([torch.zeros(1, 32, 32, 32), torch.zeros(1, 32, 32, 40)], _targets(batch=2))
    with pytest.raises(ValueError, match="Tensor"):
        detector(torch.zeros(32, 32, 32), _targets())
    with pytest.raises(ValueError, match="divisible"):
        detector(torch.zeros(1, 1, 36, 32, 32), _targets())
    with pytest.raises(ValueError, match="labels"):
        detector(torch.zeros(1, 1, 32, 32, 32), [{"box": BOX, "label": torch.tensor([3])}])
    with pytest.raises(ValueError, match="channels"):
        RetinaUNetDetector(TinyRetinaNet(5), anchor_shapes).train()(torch.zeros(1, 1, 32, 32, 32), _targets())
    with pytest.raises(ValueError, match="cls_loss"):
        RetinaUNetDetector(network, anchor_shapes, cls_loss="softmax")
    with pytest.raises(ValueError, match="detection_strides"):
        RetinaUNetDetector(nn.Conv3d(1, 1, 1), anchor_shapes)


def test_focal_loss_matches_its_definition():
    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    # gamma 0, alpha 0.5: half the BCE
    assert torch.allclose(sigmoid_focal_loss(logits, targets, gamma=0.0, alpha=0.5), 0.5 * bce)
    p = torch.sigmoid(logits)
    p_t = torch.where(targets > 0, p, 1 - p)
    alpha_t = torch.where(targets > 0, torch.tensor(0.75), torch.tensor(0.25))
    expected = alpha_t * (1 - p_t) ** 2 * bce
    assert torch.allclose(sigmoid_focal_loss(logits, targets, gamma=2.0, alpha=0.75), expected)


def test_ellipsoid_segmentation_target():
    boxes = [torch.tensor([[2.0, 2.0, 2.0, 8.0, 8.0, 8.0]]), torch.zeros(0, 6)]
    mask = ellipsoid_segmentation_target(boxes, (10, 10, 10))
    assert mask.shape == (2, 1, 10, 10, 10) and mask.dtype == torch.long
    assert mask[1].sum() == 0
    assert mask[0, 0, 4, 4, 4] == 1 and mask[0, 0, 5, 5, 5] == 1
    assert mask[0, 0, 2, 2, 2] == 0 and mask[0, 0, 7, 7, 2] == 0  # box corners are outside the ellipsoid
    assert mask[0, 0, 2, 4, 4] == 1  # face centres are inside
    # anisotropic box: the voxel count approaches the ellipsoid volume
    large = ellipsoid_segmentation_target([torch.tensor([[1.0, 2.0, 3.0, 21.0, 32.0, 15.0]])], (24, 34, 18))
    volume = 4 / 3 * math.pi * 10 * 15 * 6
    assert abs(large.sum().item() - volume) / volume < 0.03
    # a box thinner than a voxel keeps its centre voxel; a box partly outside the patch is cut
    thin = ellipsoid_segmentation_target([torch.tensor([[3.2, 3.2, 3.2, 3.4, 3.4, 3.4]])], (6, 6, 6))
    assert thin.sum() == 1 and thin[0, 0, 3, 3, 3] == 1
    cut = ellipsoid_segmentation_target([torch.tensor([[-4.0, 0.0, 0.0, 4.0, 6.0, 6.0]])], (6, 6, 6))
    assert cut[0, 0, 0, 3, 3] == 1 and cut[0, 0, 5].sum() == 0


def _random_boxes(n, generator):
    centres = torch.rand(n, 3, generator=generator) * 40
    sizes = torch.rand(n, 3, generator=generator) * 10 + 1
    return torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.6])
def test_nms_matches_monai(threshold):
    generator = torch.Generator().manual_seed(int(threshold * 10))
    boxes = _random_boxes(700, generator)  # more than one block of boxes
    scores = torch.rand(700, generator=generator)
    scores[10:20] = scores[0]  # ties are broken by the original order in both
    labels = torch.randint(0, 3, (700,), generator=generator)
    expected = monai_batched_nms(boxes, scores, labels, threshold)
    assert torch.equal(batched_nms(boxes, scores, labels, threshold), expected)
    assert torch.equal(batched_nms(boxes, scores, None, threshold), non_max_suppression(boxes, scores, threshold))
    assert torch.equal(batched_nms(boxes, scores, labels, threshold, max_detections=7), expected[:7])


def test_nms_edge_cases():
    assert batched_nms(torch.zeros(0, 6), torch.zeros(0), None, 0.5).numel() == 0
    boxes = torch.tensor([[0.0, 0, 0, 4, 4, 4], [0.0, 0, 0, 4, 4, 4], [10.0, 10, 10, 12, 12, 12]])
    scores = torch.tensor([0.5, 0.9, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 0]), 0.5).tolist() == [1, 2]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [1, 2, 0]
    with pytest.raises(ValueError):
        batched_nms(boxes[:, :4], scores, None, 0.5)


def test_full_size_detector_returns_boxes_and_scores_at_64():
    torch.manual_seed(0)
    anchors = [[w, h, d] for w in (4, 8, 14) for h in (4, 8, 14) for d in (2, 4, 6)]
    detector = RetinaUNetDetector(retina_unet_resenc(num_anchors=len(anchors)), anchor_shapes=anchors,
                                  score_thresh=0.0).eval()
    [detections] = detector(torch.randn(1, 1, 64, 64, 64))
    assert detections["box"].shape[1] == 6 and len(detections["box"]) == len(detections["label_scores"]) > 0
    assert torch.all(detections["box"][:, 3:] > detections["box"][:, :3])
    assert torch.all((detections["label_scores"] >= 0) & (detections["label_scores"] <= 1))


@pytest.mark.parametrize("cls_loss", ["focal", "bce_hnm"])
def test_anchors_in_an_ignore_region_take_no_classification_loss(anchor_shapes, cls_loss):
    torch.manual_seed(0)
    detector = RetinaUNetDetector(TinyRetinaNet(len(anchor_shapes)), anchor_shapes, cls_loss=cls_loss).train()
    images = _patch_with_box()
    negative = detector(images, _targets(empty=(0,)))
    # an ignore region (label -1) around the whole patch: no anchor is background any more
    whole = {"box": torch.tensor([[-64.0, -64.0, -64.0, 96.0, 96.0, 96.0]]), "label": torch.tensor([-1])}
    ignored = detector(images, [whole])
    assert negative["classification"] > 0
    assert ignored["classification"].item() == 0.0
    # beside an object, the object's anchors still count, and the result differs from "no ignore region"
    with_object = {"box": torch.cat([BOX, torch.tensor([[0.0, 0.0, 24.0, 8.0, 8.0, 32.0]])]),
                   "label": torch.tensor([0, -1])}
    plain = detector(images, _targets())
    partly = detector(images, [with_object])
    assert partly["classification"] > 0 and partly["box_regression"] == plain["box_regression"]
    assert partly["classification"] != plain["classification"]
