"""Retina U-Net detector: anchors, ATSS matching, training losses and patch-level decoding.

The network (any module returning the Retina U-Net output dict and exposing ``detection_strides``) is
wrapped here; everything that turns its dense outputs into losses or boxes lives in this class and reuses
MONAI's detection utilities (anchor generator, ATSS matcher, BoxCoder, BoxSelector, HardNegativeSampler,
box_utils) without MONAI's torchvision-coupled RetinaNetDetector.

Conventions: images [B, C, X, Y, Z]; boxes `xyzxyz` voxel coordinates of the patch; labels 0-based.
Network output per detection level: classification [B, A*K, x, y, z] and box regression [B, A*6, x, y, z],
anchor-major (viewable as [B, A, K, x, y, z]); segmentation logits [B, 2, X, Y, Z] at full resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.apps.detection.utils.box_selector import BoxSelector
from monai.apps.detection.utils.hard_negative_sampler import HardNegativeSampler
from monai.data.box_utils import box_iou, box_pair_giou, clip_boxes_to_image
from monai.losses import DiceCELoss
from torch import nn

from meddet.detectors.anchors import build_anchor_generator
from meddet.detectors.losses import ellipsoid_segmentation_target, sigmoid_focal_loss
from meddet.detectors.nms import batched_nms
from meddet.detectors.dispatch import as_batch, centres_inside, check_targets, detector_forward
from meddet.networks.wrappers import unwrap

_CLS_LOSSES = ("focal", "bce_hnm")
_REG_LOSSES = ("l1", "giou")
# nnDetection's classification loss weights: focal (ResEnc release) 0.3, BCE with hard negatives (v0.1) 1.0
_DEFAULT_CLS_LOSS_WEIGHT = {"focal": 0.3, "bce_hnm": 1.0}


class RetinaUNetDetector(nn.Module):
    """Retina U-Net around a dense detection network.

    Training (``detector.train()``; ``detector(images, targets)`` -> dict of scalar losses):
        1. anchors: MONAI `AnchorGeneratorWithAnchorShape` from ``anchor_shapes`` (first level) scaled by
           the network's ``detection_strides`` relative to the first (4, 8, 16, 32 -> 1, 2, 4, 8);
        2. matching: MONAI `ATSSMatcher` (``atss_num_candidates`` nearest anchors per level, IoU >= mean +
           std, ``center_in_gt``), per image;
        3. classification ("classification"), over all non-ignored anchors (ignored: ATSS's in-between anchors,
           and unmatched anchors centred inside an ignore region, a target box labelled `IGNORE_LABEL`):
           - ``"focal"``: sigmoid focal loss (``focal_gamma``, ``focal_alpha``), averaged over classes,
             summed over anchors, divided by the number of positive anchors in the batch (at least 1);
           - ``"bce_hnm"``: BCE over the positives and hard negatives picked per image by MONAI's
             `HardNegativeSampler` (``hnm_*``), averaged;
        4. box regression ("box_regression") on all positive anchors, divided by their number:
           - ``"l1"``: smooth L1 (``smooth_l1_beta``; 0 gives plain L1) between predicted and
             `BoxCoder`-encoded target deltas (weights 1), summed over the 6 deltas;
           - ``"giou"``: 1 - GIoU of decoded predicted boxes and their targets;
           zero (still attached to the graph) when the batch has no positive anchor;
        5. segmentation ("segmentation"): 0.5 * cross-entropy + 0.5 * batch soft Dice (foreground only) on
           the full-resolution logits. Datalists carry boxes, not masks, so the target marks the voxels
           inside the ellipsoid inscribed in each target box (see `ellipsoid_segmentation_target`; ignore
           regions are background there: a dense target has no "unknown" class);
        6. "loss" = cls_loss_weight * classification + reg_loss_weight * box_regression
           + seg_loss_weight * segmentation (the value to back-propagate).

    Inference (``detector.eval()``): ``detector(images)`` runs `predict_patches` on the batch;
    ``detector(images, use_inferer=True)`` hands the images and `predict_patches` to the injected
    inferer (e.g. a sliding-window box inferer), which returns the per-image detections.

    Args:
        network: module returning the Retina U-Net output dict, with a ``detection_strides`` attribute.
        anchor_shapes: [S, 3] base anchor shapes of the first detection level (see `plan_anchor_shapes`).
        num_classes: number of foreground classes K.
        cls_loss: ``"focal"`` (release) or ``"bce_hnm"`` (nnDetection v0.1).
        focal_gamma, focal_alpha: focal loss parameters (release: 1.0, 0.75).
        cls_loss_weight: weight of the classification loss; None takes nnDetection's value for the chosen
            loss (0.3 for focal, 1.0 for bce_hnm).
        reg_loss: ``"l1"`` (release, on encoded deltas) or ``"giou"`` (v0.1, on decoded boxes).
        reg_loss_weight: weight of the regression loss.
        smooth_l1_beta: smooth L1 transition point for ``"l1"`` (nnDetection: 1.0).
        seg_loss_weight: weight of the segmentation loss.
        atss_num_candidates, center_in_gt: ATSS settings (release: 4, False).
        hnm_batch_size_per_image, hnm_positive_fraction, hnm_pool_size, hnm_min_neg: hard negative
            sampling for ``"bce_hnm"`` (nnDetection v0.1: 32, 0.33, 20, 1).
        score_thresh: candidates need a sigmoid score above this.
        topk_candidates_per_level: candidates kept per level before NMS.
        nms_thresh: class-wise NMS IoU threshold (nnDetection model-level default 0.6).
        detections_per_patch: detections kept per patch after NMS (nnDetection: at least 100).
        inferer: optional object called as ``inferer(images, predict_fn)`` for ``use_inferer=True``.
    """

    def __init__(
        self,
        network: nn.Module,
        anchor_shapes: Sequence[Sequence[float]],
        num_classes: int = 1,
        cls_loss: str = "focal",
        focal_gamma: float = 1.0,
        focal_alpha: float = 0.75,
        cls_loss_weight: float | None = None,
        reg_loss: str = "l1",
        reg_loss_weight: float = 1.0,
        smooth_l1_beta: float = 1.0,
        seg_loss_weight: float = 1.0,
        atss_num_candidates: int = 4,
        center_in_gt: bool = False,
        hnm_batch_size_per_image: int = 32,
        hnm_positive_fraction: float = 0.33,
        hnm_pool_size: float = 20,
        hnm_min_neg: int = 1,
        score_thresh: float = 0.05,
        topk_candidates_per_level: int = 1000,
        nms_thresh: float = 0.6,
        detections_per_patch: int = 100,
        inferer=None,
    ) -> None:
        super().__init__()
        if cls_loss not in _CLS_LOSSES:
            raise ValueError(f"cls_loss must be one of {_CLS_LOSSES}, got {cls_loss!r}")
        if reg_loss not in _REG_LOSSES:
            raise ValueError(f"reg_loss must be one of {_REG_LOSSES}, got {reg_loss!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        strides = getattr(unwrap(network), "detection_strides", None)  # also through DDP / torch.compile
        if not strides:
            raise ValueError(f"network {type(network).__name__} has no `detection_strides` (e.g. (4, 8, 16, 32))")
        self.detection_strides = tuple(int(s) for s in strides)
        if any(s % self.detection_strides[0] for s in self.detection_strides):
            raise ValueError(f"detection_strides {self.detection_strides} must be multiples of the first one")

        self.network = network
        self.num_classes = int(num_classes)
        self.anchor_shapes = [[float(v) for v in shape] for shape in anchor_shapes]
        self.num_anchors = len(self.anchor_shapes)
        self.level_scales = [s // self.detection_strides[0] for s in self.detection_strides]
        self.anchor_generator = build_anchor_generator(self.anchor_shapes, self.level_scales)
        self.box_coder = BoxCoder(weights=(1.0,) * 6)
        self.matcher = ATSSMatcher(
            num_candidates=atss_num_candidates, similarity_fn=box_iou, center_in_gt=center_in_gt
        )

        self.cls_loss = cls_loss
        self.focal_gamma = float(focal_gamma)
        self.focal_alpha = float(focal_alpha)
        self.cls_loss_weight = float(_DEFAULT_CLS_LOSS_WEIGHT[cls_loss] if cls_loss_weight is None else cls_loss_weight)
        self.reg_loss = reg_loss
        self.reg_loss_weight = float(reg_loss_weight)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.seg_loss_weight = float(seg_loss_weight)
        self.hard_negative_sampler = (
            HardNegativeSampler(
                batch_size_per_image=hnm_batch_size_per_image,
                positive_fraction=hnm_positive_fraction,
                min_neg=hnm_min_neg,
                pool_size=hnm_pool_size,
            )
            if cls_loss == "bce_hnm"
            else None
        )
        self.segmentation_loss = DiceCELoss(
            include_background=False,
            to_onehot_y=True,
            softmax=True,
            batch=True,
            smooth_nr=0.0,
            smooth_dr=1e-5,
            lambda_dice=0.5,
            lambda_ce=0.5,
        )

        self.nms_thresh = float(nms_thresh)
        self.detections_per_patch = int(detections_per_patch)
        # Only its per-level score/top-k selection is used: its NMS is a slow Python loop.
        self.candidate_selector = BoxSelector(
            apply_sigmoid=True,
            score_thresh=score_thresh,
            topk_candidates_per_level=topk_candidates_per_level,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_patch,
        )
        self.inferer = inferer
        self._anchor_cache: tuple[tuple, list[torch.Tensor]] | None = None

    def set_inferer(self, inferer) -> None:
        """Set the object used by ``forward(..., use_inferer=True)``: ``inferer(images, predict_fn)``."""
        self.inferer = inferer

    # ------------------------------------------------------------------ entry point
    def forward(self, images, targets: Sequence[dict] | None = None, use_inferer: bool = False):
        """Losses in training mode, detections in eval mode.

        Args:
            images: Tensor [B, C, X, Y, Z], a list of [C, X, Y, Z] tensors, or one [C, X, Y, Z] image.
            targets: training mode only: B dicts with "box" [N, 6] (float, `xyzxyz` voxel) and "label" [N]
                (long); N may be 0 (negative patch).
            use_inferer: eval mode only: run the injected inferer (e.g. sliding window over whole images,
                images of a list may differ in size) instead of predicting the given patches directly.

        Returns:
            training: {"classification", "box_regression", "segmentation", "loss"} scalar tensors;
            eval: list of B dicts {"box" [N, 6], "label" [N], "label_scores" [N]}.
        """
        return detector_forward(self, images, targets, use_inferer)

    # ------------------------------------------------------------------ dense outputs -> per-anchor rows
    def _anchors_per_level(self, images: torch.Tensor, grids: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Anchors [M_l, 6] per level, rows ordered (x, y, z, anchor) like the flattened head outputs."""
        key = (tuple(images.shape[2:]), tuple(grids), images.device)
        if self._anchor_cache is None or self._anchor_cache[0] != key:
            # The generator only reads shapes, dtype and device of the maps: zero-stride views suffice.
            dummy_maps = [
                torch.zeros(1, device=images.device, dtype=torch.float32).expand(1, 1, *grid) for grid in grids
            ]
            anchors = self.anchor_generator(images[:1], dummy_maps)[0]
            counts = [self.num_anchors * int(torch.Size(grid).numel()) for grid in grids]
            self._anchor_cache = (key, list(anchors.split(counts)))
        return self._anchor_cache[1]

    def _flatten_outputs(self, outputs: dict, images: torch.Tensor):
        """Per level: logits [B, M_l, K], deltas [B, M_l, 6] (float32), anchors [M_l, 6]."""
        for key in ("classification", "box_regression"):
            if key not in outputs:
                raise KeyError(f"network output has no {key!r} entry (keys: {sorted(outputs)})")
        cls_maps, reg_maps = list(outputs["classification"]), list(outputs["box_regression"])
        if not len(cls_maps) == len(reg_maps) == len(self.detection_strides):
            raise ValueError(
                f"network returned {len(cls_maps)} classification and {len(reg_maps)} regression maps for "
                f"{len(self.detection_strides)} detection strides {self.detection_strides}"
            )
        num_a, num_k = self.num_anchors, self.num_classes
        image_size = tuple(images.shape[2:])
        logits, deltas, grids = [], [], []
        for level, (cls_map, reg_map, stride) in enumerate(zip(cls_maps, reg_maps, self.detection_strides)):
            batch, _, *grid = cls_map.shape
            if cls_map.shape[1] != num_a * num_k or reg_map.shape[1] != num_a * 6:
                raise ValueError(
                    f"level {level}: expected {num_a * num_k} classification and {num_a * 6} regression channels "
                    f"({num_a} anchors x {num_k} classes), got {cls_map.shape[1]} and {reg_map.shape[1]}"
                )
            if tuple(reg_map.shape[2:]) != tuple(grid) or tuple(g * stride for g in grid) != image_size:
                raise ValueError(
                    f"level {level} (stride {stride}): maps {tuple(cls_map.shape[2:])} / {tuple(reg_map.shape[2:])} "
                    f"do not tile the patch {image_size}; patch sizes must be divisible by the largest stride"
                )
            logits.append(cls_map.view(batch, num_a, num_k, *grid).permute(0, 3, 4, 5, 1, 2).reshape(batch, -1, num_k))
            deltas.append(reg_map.view(batch, num_a, 6, *grid).permute(0, 3, 4, 5, 1, 2).reshape(batch, -1, 6))
            grids.append(tuple(grid))
        anchors = self._anchors_per_level(images, grids)
        return [x.float() for x in logits], [x.float() for x in deltas], anchors

    # ------------------------------------------------------------------ training
    def compute_losses(self, images: torch.Tensor, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Network forward on a batch of patches and the training losses (see the class docstring)."""
        outputs = self.network(images)
        level_logits, level_deltas, level_anchors = self._flatten_outputs(outputs, images)
        logits = torch.cat(level_logits, dim=1)  # [B, M, K]
        deltas = torch.cat(level_deltas, dim=1)  # [B, M, 6]
        anchors = torch.cat(level_anchors, dim=0)  # [M, 6]
        locations_per_level = [len(a) // self.num_anchors for a in level_anchors]
        checked = check_targets(targets, images.shape[0], self.num_classes, images.device)

        cls_targets = torch.zeros_like(logits)
        valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        positive_rows = []  # per image: (anchor indices, matched gt boxes)
        anchor_centres = (anchors[:, :3] + anchors[:, 3:]) / 2
        for image_index, (boxes, labels, ignore_boxes) in enumerate(checked):
            if len(boxes):
                _, matched = self.matcher(boxes, anchors, locations_per_level, self.num_anchors)
            else:
                matched = torch.full((len(anchors),), ATSSMatcher.BELOW_LOW_THRESHOLD, device=anchors.device)
            matched = matched.to(anchors.device)
            positive = torch.nonzero(matched >= 0).squeeze(1)
            cls_targets[image_index, positive, labels[matched[positive]]] = 1.0
            # anchors centred in an ignore region are neither foreground nor background, unless matched
            on_ignore = centres_inside(anchor_centres, ignore_boxes.to(anchors.device)) & (matched < 0)
            valid[image_index] = (matched != ATSSMatcher.BETWEEN_THRESHOLDS) & ~on_ignore
            positive_rows.append((positive, boxes[matched[positive]]))
        num_positive = sum(len(rows) for rows, _ in positive_rows)

        cls = self._classification_loss(logits, cls_targets, valid, num_positive)
        reg = self._regression_loss(deltas, anchors, positive_rows, num_positive)
        seg = self._segmentation_loss(outputs, images, [boxes for boxes, _, _ in checked])
        total = self.cls_loss_weight * cls + self.reg_loss_weight * reg + self.seg_loss_weight * seg
        return {"classification": cls, "box_regression": reg, "segmentation": seg, "loss": total}

    def _classification_loss(self, logits, cls_targets, valid, num_positive: int) -> torch.Tensor:
        if self.cls_loss == "focal":
            per_anchor = sigmoid_focal_loss(logits, cls_targets, self.focal_gamma, self.focal_alpha).mean(dim=-1)
            return (per_anchor * valid).sum() / max(1, num_positive)
        # bce_hnm: positives labelled 1, negatives 0, ignored anchors -1 (never sampled)
        sample_labels = cls_targets.amax(dim=-1).long()
        sample_labels[~valid] = -1
        fg_probs = torch.sigmoid(logits.detach()).amax(dim=-1)
        pos_masks, neg_masks = self.hard_negative_sampler.select_samples_img_list(list(sample_labels), list(fg_probs))
        sampled = (torch.stack(pos_masks) + torch.stack(neg_masks)) > 0
        if not bool(sampled.any()):  # every anchor ignored (a patch inside an ignore region): nothing to learn
            return logits.sum() * 0.0
        return F.binary_cross_entropy_with_logits(logits[sampled], cls_targets[sampled], reduction="mean")

    def _regression_loss(self, deltas, anchors, positive_rows, num_positive: int) -> torch.Tensor:
        if num_positive == 0:
            return deltas.sum() * 0.0  # keeps every head parameter in the graph (DDP)
        pred = torch.cat([deltas[i, rows] for i, (rows, _) in enumerate(positive_rows)])
        matched_anchors = torch.cat([anchors[rows] for rows, _ in positive_rows])
        gt_boxes = torch.cat([boxes for _, boxes in positive_rows])
        if self.reg_loss == "l1":
            target = self.box_coder.encode_single(gt_boxes, matched_anchors)
            return F.smooth_l1_loss(pred, target, beta=self.smooth_l1_beta, reduction="sum") / num_positive
        pred_boxes = self.box_coder.decode_single(pred, matched_anchors)
        return (1.0 - box_pair_giou(pred_boxes, gt_boxes)).sum() / num_positive

    def _segmentation_loss(self, outputs: dict, images: torch.Tensor, boxes_per_image) -> torch.Tensor:
        seg_logits = outputs.get("segmentation")
        expected = (images.shape[0], 2, *images.shape[2:])
        if seg_logits is None or tuple(seg_logits.shape) != expected:
            got = None if seg_logits is None else tuple(seg_logits.shape)
            raise ValueError(f"network 'segmentation' output must have shape {expected} (bg/fg logits), got {got}")
        target = ellipsoid_segmentation_target(boxes_per_image, images.shape[2:], device=seg_logits.device)
        return self.segmentation_loss(seg_logits.float(), target)

    # ------------------------------------------------------------------ inference
    def predict_patches(self, patches) -> list[dict[str, torch.Tensor]]:
        """Detections for each patch of a batch, in the patch's voxel coordinates.

        Steps per patch: per level, sigmoid scores above ``score_thresh``, top ``topk_candidates_per_level``
        (anchor, class) pairs; decode their deltas with BoxCoder; clip to the patch (boxes thinner than one
        voxel after clipping are dropped); class-wise NMS at ``nms_thresh``; keep the best
        ``detections_per_patch``.

        Args:
            patches: Tensor [B, C, X, Y, Z] (or a list of equally sized [C, X, Y, Z]).

        Returns:
            B dicts: "box" float [N, 6] `xyzxyz`, "label" long [N], "label_scores" float [N] (by decreasing
            score).
        """
        patches = as_batch(patches)
        with torch.no_grad():
            outputs = self.network(patches)
            level_logits, level_deltas, level_anchors = self._flatten_outputs(outputs, patches)
            spatial_size = tuple(patches.shape[2:])
            return [
                self._select_detections(
                    [x[i] for x in level_logits], [x[i] for x in level_deltas], level_anchors, spatial_size
                )
                for i in range(patches.shape[0])
            ]

    def _select_detections(self, logits, deltas, anchors, spatial_size) -> dict[str, torch.Tensor]:
        boxes, scores, labels = [], [], []
        for level_logits, level_deltas, level_anchors in zip(logits, deltas, anchors):
            rows, level_scores, level_labels = self.candidate_selector.select_top_score_idx_per_level(level_logits)
            if len(rows) == 0:
                continue
            boxes.append(self.box_coder.decode_single(level_deltas[rows], level_anchors[rows]))
            scores.append(level_scores)
            labels.append(level_labels)
        device = logits[0].device
        if not boxes:
            return {
                "box": torch.zeros((0, 6), device=device),
                "label": torch.zeros(0, dtype=torch.long, device=device),
                "label_scores": torch.zeros(0, device=device),
            }
        boxes, keep = clip_boxes_to_image(torch.cat(boxes), spatial_size, remove_empty=True)
        scores, labels = torch.cat(scores)[keep], torch.cat(labels)[keep].long()
        keep = batched_nms(boxes, scores, labels, self.nms_thresh, self.detections_per_patch)
        return {"box": boxes[keep].float(), "label": labels[keep], "label_scores": scores[keep].float()}
