"""Deformable DETR detector: set-prediction losses with Hungarian matching, and top-K patch decoding.

The network (e.g. `meddet.networks.DeformableDETR`) returns normalised `cccwhd` boxes (fractions of the patch)
and class logits per query; this class turns them into losses or voxel detections and has the same interface
as `RetinaUNetDetector` (training: loss dict; eval: detections, optionally through an injected inferer).

Because boxes are fractions of the patch, train and infer on one patch size (sliding window with
``roi_size`` = training patch size), or box scales will not carry over.

Conventions: images [B, C, X, Y, Z]; target and detection boxes `xyzxyz` in voxels of the patch; labels 0-based.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from monai.data.box_utils import box_pair_giou, clip_boxes_to_image, convert_box_mode
from torch import nn

from meddet.detectors.losses import sigmoid_focal_loss
from meddet.detectors.matching import cccwhd_to_xyzxyz, hungarian_match, match_cost
from meddet.detectors.dispatch import as_batch, centres_inside, check_targets, detector_forward

MIN_QUERIES = 12


def plan_num_queries(objects_per_patch: Sequence[int]) -> int:
    """Number of decoder queries: max(12, ceil(3 x the 95th percentile of objects per training patch))."""
    counts = np.asarray(list(objects_per_patch), dtype=np.float64).reshape(-1)
    if counts.size == 0:
        raise ValueError("plan_num_queries: objects_per_patch is empty; give the object count of every training patch")
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError(f"plan_num_queries: object counts must be finite and >= 0, got {counts.tolist()}")
    return int(max(MIN_QUERIES, math.ceil(3.0 * float(np.percentile(counts, 95)) - 1e-9)))


def _num_boxes_across_ranks(count: int, device: torch.device) -> float:
    """Target boxes per rank averaged over DDP ranks (the loss normaliser), at least 1."""
    total = torch.as_tensor(float(count), dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        total = total / dist.get_world_size()
    return max(float(total.item()), 1.0)


class DeformableDETRDetector(nn.Module):
    """Deformable DETR around a set-prediction network.

    Training (``detector.train()``; ``detector(images, targets)`` -> dict of scalar losses):
        1. targets (voxel `xyzxyz`) are clipped to the patch (boxes left without volume are dropped) and
           converted to normalised `cccwhd`;
        2. for the last decoder layer, every earlier one ("aux_outputs") and the two-stage proposals
           ("enc_outputs", all labels taken as class 0: proposals are class-agnostic), each image's queries
           are matched one-to-one to its targets by the Hungarian algorithm on `match_cost`
           (``cost_class`` * focal class cost + ``cost_bbox`` * L1 + ``cost_giou`` * -GIoU);
        3. per prediction set: sigmoid focal loss (``focal_gamma``, ``focal_alpha``) over all queries and
           classes (matched queries target their class), summed; L1 on the matched normalised cccwhd boxes,
           summed over the 6 coordinates; 1 - GIoU of the matched boxes, summed; each divided by the number
           of target boxes in the batch averaged over DDP ranks (at least 1). Negative patches contribute
           classification only (box terms stay attached to the graph at zero). Unmatched queries whose box
           centre lies inside an ignore region (a target labelled `IGNORE_LABEL`) take no classification loss;
        4. set loss = ``cls_loss_weight`` * focal + ``bbox_loss_weight`` * L1 + ``giou_loss_weight`` * GIoU;
           "loss" = set loss of the last layer + those of the earlier layers ("aux_decoder") + that of the
           proposals ("aux_encoder"). Also returned: the last layer's unweighted "classification",
           "box_l1", "box_giou".

    Inference (``detector.eval()``): ``detector(images)`` runs `predict_patches`; ``detector(images,
    use_inferer=True)`` hands the images and `predict_patches` to the injected inferer.

    Args:
        network: module returning {"pred_logits" [B, Q, K], "pred_boxes" [B, Q, 6] normalised cccwhd,
            optional "aux_outputs" (list of such dicts), optional "enc_outputs" (such a dict with K = 1)}.
        num_classes: number of foreground classes K.
        cost_class, cost_bbox, cost_giou: matching cost weights (release: 2, 5, 2).
        focal_gamma, focal_alpha: focal loss and focal class cost parameters (release: 1.0, 0.75).
        cls_loss_weight, bbox_loss_weight, giou_loss_weight: loss weights (release: 1, 5, 2).
        score_thresh: detections need a sigmoid score above this.
        detections_per_patch: top-K (query, class) pairs kept per patch (no NMS).
        inferer: optional object called as ``inferer(images, predict_fn)`` for ``use_inferer=True``.
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int = 1,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_gamma: float = 1.0,
        focal_alpha: float = 0.75,
        cls_loss_weight: float = 1.0,
        bbox_loss_weight: float = 5.0,
        giou_loss_weight: float = 2.0,
        score_thresh: float = 0.0,
        detections_per_patch: int = 100,
        inferer=None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if detections_per_patch < 1:
            raise ValueError(f"detections_per_patch must be >= 1, got {detections_per_patch}")
        self.network = network
        self.num_classes = int(num_classes)
        self.cost_weights = {"cost_class": float(cost_class), "cost_bbox": float(cost_bbox),
                             "cost_giou": float(cost_giou)}
        self.focal_gamma = float(focal_gamma)
        self.focal_alpha = float(focal_alpha)
        self.cls_loss_weight = float(cls_loss_weight)
        self.bbox_loss_weight = float(bbox_loss_weight)
        self.giou_loss_weight = float(giou_loss_weight)
        self.score_thresh = float(score_thresh)
        self.detections_per_patch = int(detections_per_patch)
        self.inferer = inferer

    def set_inferer(self, inferer) -> None:
        """Set the object used by ``forward(..., use_inferer=True)``: ``inferer(images, predict_fn)``."""
        self.inferer = inferer

    # ------------------------------------------------------------------ entry point
    def forward(self, images, targets: Sequence[dict] | None = None, use_inferer: bool = False):
        """Losses in training mode, detections in eval mode.

        Args:
            images: Tensor [B, C, X, Y, Z], a list of [C, X, Y, Z] tensors, or one [C, X, Y, Z] image.
            targets: training mode only: B dicts with "box" [N, 6] (float, `xyzxyz` voxel of the patch) and
                "label" [N] (long); N may be 0 (negative patch).
            use_inferer: eval mode only: run the injected inferer (e.g. sliding window over whole images)
                instead of predicting the given patches directly.

        Returns:
            training: {"classification", "box_l1", "box_giou", "aux_decoder", "aux_encoder", "loss"} scalars;
            eval: list of B dicts {"box" [N, 6], "label" [N], "label_scores" [N]}.
        """
        return detector_forward(self, images, targets, use_inferer)

    # ------------------------------------------------------------------ training
    def _normalised_targets(self, targets: Sequence[dict], batch: int, image_size, device):
        """Per image (labels [N], normalised cccwhd boxes [N, 6], ignore regions [I, 6] normalised `xyzxyz`)
        after clipping to the patch."""
        size = torch.as_tensor(image_size, dtype=torch.float32, device=device)
        normalised = []
        for boxes, labels, ignore_boxes in check_targets(targets, batch, self.num_classes, device):
            if len(boxes):
                boxes, keep = clip_boxes_to_image(boxes, tuple(image_size), remove_empty=True)
                labels = labels[keep]
            centred = convert_box_mode(boxes, src_mode="xyzxyz", dst_mode="cccwhd") / torch.cat([size, size])
            normalised.append((labels, centred, ignore_boxes / torch.cat([size, size])))
        return normalised

    def compute_losses(self, images: torch.Tensor, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Network forward on a batch of patches and the training losses (see the class docstring)."""
        outputs = self.network(images)
        for key in ("pred_logits", "pred_boxes"):
            if key not in outputs:
                raise KeyError(f"network output has no {key!r} entry (keys: {sorted(outputs)})")
        image_size = tuple(int(s) for s in images.shape[2:])
        checked = self._normalised_targets(targets, images.shape[0], image_size, images.device)
        num_boxes = _num_boxes_across_ranks(sum(len(labels) for labels, _, _ in checked), images.device)

        cls, l1, giou = self._set_losses(outputs, checked, num_boxes, image_size)
        losses = {"classification": cls, "box_l1": l1, "box_giou": giou}
        losses["aux_decoder"] = sum(
            (self._weighted(*self._set_losses(aux, checked, num_boxes, image_size))
             for aux in outputs.get("aux_outputs", [])),
            torch.zeros((), device=images.device),
        )
        if outputs.get("enc_outputs") is not None:
            agnostic = [(torch.zeros_like(labels), boxes, ignore) for labels, boxes, ignore in checked]
            losses["aux_encoder"] = self._weighted(
                *self._set_losses(outputs["enc_outputs"], agnostic, num_boxes, image_size)
            )
        else:
            losses["aux_encoder"] = torch.zeros((), device=images.device)
        losses["loss"] = self._weighted(cls, l1, giou) + losses["aux_decoder"] + losses["aux_encoder"]
        return losses

    def _weighted(self, cls: torch.Tensor, l1: torch.Tensor, giou: torch.Tensor) -> torch.Tensor:
        return self.cls_loss_weight * cls + self.bbox_loss_weight * l1 + self.giou_loss_weight * giou

    def _set_losses(self, prediction: dict, targets, num_boxes: float, image_size):
        """(focal, L1, 1 - GIoU) of one prediction set, each summed and divided by ``num_boxes``."""
        logits = prediction["pred_logits"].float()  # [B, Q, K]
        boxes = prediction["pred_boxes"].float()  # [B, Q, 6]
        class_targets = torch.zeros_like(logits)
        weights = torch.ones_like(logits[..., :1])
        matched_pred, matched_gt = [], []
        for image_index, (labels, gt_boxes, ignore_boxes) in enumerate(targets):
            # queries left unmatched whose box centre lies in an ignore region are not taught "no object"
            weights[image_index, centres_inside(boxes[image_index, :, :3].detach(), ignore_boxes), 0] = 0.0
            if len(labels) == 0:
                continue
            cost = match_cost(
                logits[image_index], boxes[image_index], labels, gt_boxes, **self.cost_weights,
                focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma, image_size=image_size,
            )
            query_idx, gt_idx = hungarian_match(cost)
            class_targets[image_index, query_idx, labels[gt_idx]] = 1.0
            weights[image_index, query_idx, 0] = 1.0
            matched_pred.append(boxes[image_index, query_idx])
            matched_gt.append(gt_boxes[gt_idx])
        cls = (sigmoid_focal_loss(logits, class_targets, self.focal_gamma, self.focal_alpha) * weights).sum() / num_boxes
        if not matched_pred:
            zero = boxes.sum() * 0.0  # keeps the box heads in the graph (DDP)
            return cls, zero, zero
        pred, gt = torch.cat(matched_pred), torch.cat(matched_gt)
        l1 = (pred - gt).abs().sum() / num_boxes
        giou = box_pair_giou(cccwhd_to_xyzxyz(pred, image_size), cccwhd_to_xyzxyz(gt, image_size))
        return cls, l1, (1.0 - giou).sum() / num_boxes

    # ------------------------------------------------------------------ inference
    def predict_patches(self, patches) -> list[dict[str, torch.Tensor]]:
        """Detections for each patch of a batch, in the patch's voxel coordinates.

        Per patch: sigmoid scores of all (query, class) pairs, the top ``detections_per_patch`` above
        ``score_thresh`` (no NMS: the set loss already discourages duplicates); their normalised cccwhd boxes
        scaled to the patch and converted to `xyzxyz`, clipped to the patch (boxes left without volume dropped).

        Args:
            patches: Tensor [B, C, X, Y, Z] (or a list of equally sized [C, X, Y, Z]).

        Returns:
            B dicts: "box" float [N, 6] `xyzxyz`, "label" long [N], "label_scores" float [N] (by decreasing score).
        """
        patches = as_batch(patches)
        image_size = tuple(int(s) for s in patches.shape[2:])
        with torch.no_grad():
            outputs = self.network(patches)
            logits = outputs["pred_logits"].float()
            boxes = outputs["pred_boxes"].float()
            num_queries, num_classes = logits.shape[1:]
            if num_classes != self.num_classes:
                raise ValueError(f"network predicts {num_classes} classes, the detector expects {self.num_classes}")
            scores, flat_idx = logits.sigmoid().flatten(1).topk(min(self.detections_per_patch,
                                                                   num_queries * num_classes), dim=1)
            detections = []
            for image_index in range(patches.shape[0]):
                keep = scores[image_index] > self.score_thresh
                image_scores, image_idx = scores[image_index][keep], flat_idx[image_index][keep]
                queries = torch.div(image_idx, num_classes, rounding_mode="floor")
                labels = image_idx % num_classes
                voxel_boxes = cccwhd_to_xyzxyz(boxes[image_index, queries], image_size)
                voxel_boxes, kept = clip_boxes_to_image(voxel_boxes, image_size, remove_empty=True)
                detections.append({
                    "box": voxel_boxes.float(),
                    "label": labels[kept].long(),
                    "label_scores": image_scores[kept].float(),
                })
            return detections
