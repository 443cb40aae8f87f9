"""Tests for the 3D Deformable DETR: position embedding, network, detector losses, decoding and query planning."""

import math
import time

import pytest
import torch
from monai.data.box_utils import box_iou
from torch import nn

from meddet.detectors import DeformableDETRDetector, plan_num_queries
from meddet.detectors.deformable_detr import _num_boxes_across_ranks
from meddet.networks import PositionEmbeddingSine3D, build_resenc_encoder, deformable_detr_resenc
from meddet.networks.position_encoding import split_features

torch.set_num_threads(1)

TINY = dict(
    features_per_stage=(8, 16, 32, 32), strides=(2, 2, 2, 2), blocks_per_stage=(1, 1, 1, 1),
    detection_levels=(1, 2, 3), d_model=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=4, num_points=2,
    dim_feedforward=64, num_queries=6,
)
BOX = torch.tensor([[9.0, 11.0, 7.0, 21.0, 19.0, 17.0]])  # 12 x 8 x 10 voxels inside a 32^3 patch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bright_box_image(box=BOX, size=(32, 32, 32)):
    image = torch.randn(1, 1, *size) * 0.1
    x1, y1, z1, x2, y2, z2 = [int(v) for v in box[0]]
    image[0, 0, x1:x2, y1:y2, z1:z2] += 1.0
    return image


# ---------------------------------------------------------------- position embedding
def test_position_embedding_split_and_axis_dependence():
    assert split_features(128) == (42, 42, 44)
    assert split_features(32) == (10, 10, 12)
    with pytest.raises(ValueError, match="even"):
        split_features(127)
    embedding = PositionEmbeddingSine3D(32)(torch.zeros(2, 5, 4, 3, 6))
    assert embedding.shape == (2, 32, 4, 3, 6)
    x_part, y_part, z_part = embedding[0, :10], embedding[0, 10:20], embedding[0, 20:]
    for part, axis in ((x_part, 1), (y_part, 2), (z_part, 3)):
        others = [a for a in (1, 2, 3) if a != axis]
        assert torch.allclose(part, part.mean(dim=others, keepdim=True).expand_as(part), atol=1e-6)
        assert part.std(dim=axis).mean() > 0.01  # varies along its own axis
    # first frequency pair of x: sin and cos of 2 pi (i + 0.5) / 4
    angles = 2 * math.pi * (torch.arange(4) + 0.5) / 4
    assert torch.allclose(x_part[0, :, 0, 0], angles.sin(), atol=1e-6)
    assert torch.allclose(x_part[1, :, 0, 0], angles.cos(), atol=1e-6)


# ---------------------------------------------------------------- network
def test_full_size_network_builds_and_runs_at_64():
    net = deformable_detr_resenc()
    encoder_parameters = count_parameters(net.encoder)
    total = count_parameters(net)
    print(f"\nfull-size Deformable DETR: {total} parameters ({total / 1e6:.2f} M; "
          f"encoder {encoder_parameters / 1e6:.2f} M)")
    assert abs(encoder_parameters - 90.30e6) <= 0.01e6
    assert net.detection_strides == (4, 8, 16, 32) and net.total_stride == 32
    assert [m[0].in_channels for m in net.channel_mapper] == [128, 256, 320, 320]
    assert len(net.encoder_layers) == 3 and len(net.decoder_layers) == 6

    net.eval()
    start = time.perf_counter()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 64, 64, 64))
    print(f"full-size forward 1x1x64^3 (1 thread): {time.perf_counter() - start:.2f} s")
    queries, tokens = net.num_queries, sum((64 // s) ** 3 for s in (4, 8, 16, 32))
    assert out["pred_logits"].shape == (1, queries, 1)
    assert out["pred_boxes"].shape == (1, queries, 6)
    assert len(out["aux_outputs"]) == 5
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (1, queries, 1) and aux["pred_boxes"].shape == (1, queries, 6)
    assert out["enc_outputs"]["pred_logits"].shape == (1, tokens, 1)
    assert out["enc_outputs"]["pred_boxes"].shape == (1, tokens, 6)
    boxes = torch.cat([out["pred_boxes"], out["enc_outputs"]["pred_boxes"]], dim=1)
    assert bool(((boxes > 0) & (boxes < 1)).all())


def test_pretrained_encoder_keys_load_into_the_network():
    kwargs = {k: TINY[k] for k in ("features_per_stage", "strides", "blocks_per_stage")}
    pretrained = build_resenc_encoder(**kwargs)
    state = {f"encoder.{key}": value for key, value in pretrained.state_dict().items()}
    assert any(k.startswith("encoder.stem.") for k in state) and any(k.startswith("encoder.stages.") for k in state)
    net = deformable_detr_resenc(**TINY)
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected
    assert not [k for k in missing if k.startswith("encoder.")]
    assert torch.equal(net.encoder.stem.convs[0].conv.weight, pretrained.stem.convs[0].conv.weight)


def test_initial_boxes_are_the_selected_proposals():
    net = deformable_detr_resenc(**TINY).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 32, 32, 32))
    # zero-initialised box heads: the first prediction is the proposal itself (size 0.05 * 2^level)
    sizes = out["pred_boxes"][..., 3:]
    assert torch.allclose(sizes, sizes[..., :1].expand_as(sizes), atol=1e-5)
    proposal_sizes = {round(0.05 * 2 ** level, 4) for level in range(3)}
    assert {round(float(s), 4) for s in sizes[..., 0].flatten()} <= proposal_sizes
    assert torch.allclose(out["enc_outputs"]["pred_boxes"][0, 0], torch.tensor([1 / 16, 1 / 16, 1 / 16] + [0.05] * 3))


def test_single_stage_variant_and_input_checks():
    net = deformable_detr_resenc(**dict(TINY, two_stage=False, num_classes=3)).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 32, 16, 48))
    assert out["pred_logits"].shape == (1, 6, 3) and out["pred_boxes"].shape == (1, 6, 6)
    assert "enc_outputs" not in out
    with pytest.raises(ValueError, match="divisible by the network's total stride 16"):
        net(torch.randn(1, 1, 40, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, C, X, Y, Z\]"):
        net(torch.randn(1, 32, 32, 32))
    with pytest.raises(ValueError, match="detection_levels"):
        deformable_detr_resenc(**dict(TINY, detection_levels=(2, 4)))
    with pytest.raises(ValueError, match="num_queries 600 exceeds"):
        deformable_detr_resenc(**dict(TINY, num_queries=600))(torch.randn(1, 1, 32, 32, 32))


# ---------------------------------------------------------------- detector: training
def tiny_detector(**overrides):
    network = deformable_detr_resenc(**dict(TINY, **overrides))
    return DeformableDETRDetector(network, num_classes=network.num_classes)


def test_training_step_gives_finite_losses_and_gradients_everywhere():
    detector = tiny_detector(num_decoder_layers=2, num_classes=2).train()
    images = torch.randn(2, 1, 32, 32, 32)
    targets = [
        {"box": torch.cat([BOX, BOX + 4]), "label": torch.tensor([0, 1])},
        {"box": torch.zeros(0, 6), "label": torch.zeros(0, dtype=torch.long)},
    ]
    losses = detector(images, targets)
    assert set(losses) == {"classification", "box_l1", "box_giou", "aux_decoder", "aux_encoder", "loss"}
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name
    assert losses["box_l1"] > 0 and losses["box_giou"] > 0 and losses["aux_decoder"] > 0 and losses["aux_encoder"] > 0
    expected = losses["classification"] + 5 * losses["box_l1"] + 2 * losses["box_giou"]
    assert torch.allclose(losses["loss"], expected + losses["aux_decoder"] + losses["aux_encoder"])
    losses["loss"].backward()
    for name, parameter in detector.named_parameters():
        assert parameter.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(parameter.grad).all(), name
    # At initialisation the deformable attention ignores its query (zero offset and attention weights), so
    # the position embeddings only get a gradient from the second step on.
    torch.optim.SGD(detector.parameters(), lr=1e-3).step()
    detector.zero_grad()
    detector(images, targets)["loss"].backward()
    for name, parameter in detector.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name
        # the encoder's residual branches end in a zero-initialised norm, so some encoder grads are exactly 0
        if not name.startswith("network.encoder."):
            assert parameter.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_negative_patches_give_finite_losses():
    detector = tiny_detector().train()
    empty = {"box": torch.zeros(0, 6), "label": torch.zeros(0, dtype=torch.long)}
    losses = detector(torch.randn(2, 1, 32, 32, 32), [empty, dict(empty)])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["box_l1"] == 0 and losses["box_giou"] == 0 and losses["classification"] > 0
    losses["loss"].backward()
    head = detector.network.box_heads[0].layers[0].weight
    assert head.grad is not None and torch.isfinite(head.grad).all()


class ScriptedSetNetwork(nn.Module):
    """Returns fixed normalised cccwhd boxes and logits for every image of the batch."""

    def __init__(self, boxes, logits):
        super().__init__()
        self.boxes, self.logits = boxes, logits
        self.anchor = nn.Parameter(torch.zeros(()))  # something for autograd to reach

    def forward(self, x):
        batch = x.shape[0]
        return {"pred_logits": (self.logits + self.anchor).expand(batch, -1, -1),
                "pred_boxes": self.boxes.expand(batch, -1, -1)}


def test_targets_are_normalised_by_the_patch_size():
    size = (32, 16, 48)
    target = torch.tensor([[8.0, 0.0, 21.0, 20.0, 8.0, 27.0]])  # cccwhd (14, 4, 24, 12, 8, 6) in voxels
    normalised = torch.tensor([14 / 32, 4 / 16, 24 / 48, 12 / 32, 8 / 16, 6 / 48])
    boxes = torch.stack([torch.tensor([0.5, 0.5, 0.5, 0.1, 0.1, 0.1]), normalised])[None]
    detector = DeformableDETRDetector(ScriptedSetNetwork(boxes, torch.tensor([[[-5.0], [5.0]]]))).train()
    losses = detector(torch.zeros(1, 1, *size), [{"box": target, "label": torch.tensor([0])}])
    assert losses["box_l1"] < 1e-6 and losses["box_giou"] < 1e-5
    # a target sticking out of the patch is clipped to it first
    sticking_out = target + torch.tensor([[0.0, -5.0, 0.0, 0.0, 0.0, 0.0]])
    losses = detector(torch.zeros(1, 1, *size), [{"box": sticking_out, "label": torch.tensor([0])}])
    assert losses["box_l1"] < 1e-6


def test_num_boxes_normaliser_is_at_least_one():
    assert _num_boxes_across_ranks(0, torch.device("cpu")) == 1.0
    assert _num_boxes_across_ranks(7, torch.device("cpu")) == 7.0


def test_bad_targets_raise():
    detector = tiny_detector().train()
    with pytest.raises(ValueError, match="labels must lie in"):
        detector(torch.randn(1, 1, 32, 32, 32), [{"box": BOX, "label": torch.tensor([1])}])
    with pytest.raises(ValueError, match="x2 > x1"):
        detector(torch.randn(1, 1, 32, 32, 32), [{"box": BOX[:, [3, 4, 5, 0, 1, 2]], "label": torch.tensor([0])}])
    with pytest.raises(ValueError, match="needs targets"):
        detector(torch.randn(1, 1, 32, 32, 32))


# ---------------------------------------------------------------- detector: inference
def test_predict_patches_format_and_coordinate_frame():
    size = (32, 16, 48)
    boxes = torch.tensor([[[0.5, 0.25, 0.5, 0.25, 0.5, 0.125],  # -> xyzxyz (12, 0, 21, 20, 8, 27)
                           [0.1, 0.9, 0.5, 0.4, 0.4, 0.2],  # partly outside: clipped
                           [0.5, 0.5, 0.5, 0.2, 0.2, 0.2]]])
    logits = torch.tensor([[[3.0, -2.0], [0.0, 1.0], [-1.0, -6.0]]])
    detector = DeformableDETRDetector(ScriptedSetNetwork(boxes, logits), num_classes=2, detections_per_patch=4).eval()
    detections = detector(torch.zeros(2, 1, *size))
    assert len(detections) == 2
    first = detections[0]
    assert set(first) == {"box", "label", "label_scores"}
    assert first["box"].shape == (4, 6) and first["box"].dtype == torch.float32
    assert first["label"].dtype == torch.long and first["label_scores"].dtype == torch.float32
    assert torch.all(first["label_scores"][:-1] >= first["label_scores"][1:])
    assert torch.allclose(first["label_scores"], torch.sigmoid(torch.tensor([3.0, 1.0, 0.0, -1.0])))
    assert first["label"].tolist() == [0, 1, 0, 0]
    assert torch.allclose(first["box"][0], torch.tensor([12.0, 0.0, 21.0, 20.0, 8.0, 27.0]), atol=1e-4)
    assert torch.allclose(first["box"][1], torch.tensor([0.0, 11.2, 19.2, 9.6, 16.0, 28.8]), atol=1e-4)
    limits = torch.tensor(size * 2, dtype=torch.float32)
    assert bool((first["box"] >= 0).all() and (first["box"] <= limits).all())

    detector.score_thresh = 0.5
    assert detector.predict_patches(torch.zeros(1, 1, *size))[0]["label"].tolist() == [0, 1]


def test_inferer_routing():
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.2, 0.2, 0.2]]])
    detector = DeformableDETRDetector(ScriptedSetNetwork(boxes, torch.zeros(1, 1, 1))).eval()
    with pytest.raises(RuntimeError, match="no inferer"):
        detector(torch.zeros(1, 1, 8, 8, 8), use_inferer=True)
    calls = []

    def inferer(images, predict):
        calls.append(tuple(images.shape))
        return predict(images)

    detector.set_inferer(inferer)
    out = detector([torch.zeros(1, 8, 8, 8), torch.zeros(1, 16, 8, 8)], use_inferer=True)
    assert calls == [(1, 1, 8, 8, 8), (1, 1, 16, 8, 8)] and len(out) == 2
    assert torch.allclose(out[1]["box"][0], torch.tensor([6.4, 3.2, 3.2, 9.6, 4.8, 4.8]), atol=1e-5)


def test_overfits_one_patch():
    detector = tiny_detector()
    image = bright_box_image()
    target = [{"box": BOX, "label": torch.tensor([0])}]
    optimizer = torch.optim.Adam(detector.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(150):
        detector.train()
        loss = detector(image, target)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    detector.eval()
    top = detector(image)[0]
    print(f"\noverfit: 150 iterations in {time.perf_counter() - start:.1f} s, "
          f"top IoU {float(box_iou(top['box'][:1], BOX)):.3f}, score {float(top['label_scores'][0]):.3f}")
    assert float(box_iou(top["box"][:1], BOX)) > 0.5
    assert top["label_scores"][0] > 0.5


# ---------------------------------------------------------------- query planning
def test_plan_num_queries():
    assert plan_num_queries([0, 1, 1, 2]) == 12  # 3 x 1.85 < 12
    assert plan_num_queries(list(range(21))) == 57  # 95th percentile 19
    assert plan_num_queries([5] * 10) == 15
    with pytest.raises(ValueError, match="empty"):
        plan_num_queries([])
    with pytest.raises(ValueError, match=">= 0"):
        plan_num_queries([1, -1])


def test_queries_in_an_ignore_region_are_not_taught_no_object():
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.2, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])[None]
    detector = DeformableDETRDetector(ScriptedSetNetwork(boxes, torch.tensor([[[2.0], [2.0]]]))).train()
    empty = {"box": torch.zeros(0, 6), "label": torch.zeros(0, dtype=torch.long)}
    around_second = {"box": torch.tensor([[0.0, 0.0, 0.0, 6.0, 6.0, 6.0]]), "label": torch.tensor([-1])}
    around_both = {"box": torch.tensor([[0.0, 0.0, 0.0, 32.0, 32.0, 32.0]]), "label": torch.tensor([-1])}
    image = torch.zeros(1, 1, 32, 32, 32)
    plain = detector(image, [empty])["classification"]
    one = detector(image, [around_second])["classification"]
    both = detector(image, [around_both])["classification"]
    # both queries are equally confident false positives: ignoring one halves the loss, ignoring both zeroes it
    assert plain > 0 and one.item() == pytest.approx(plain.item() / 2, rel=1e-6) and both.item() == 0.0
