"""Ignite metric: COCO mAP of a validation run, for model selection inside an ignite/MONAI engine.

Usage::

    metric = DetectionMAP(class_names=["lesion"])            # value: mAP_IoU_0.10_0.50_0.05_MaxDet_100
    metric.attach(evaluator, "val_mAP")
    evaluator.run(loader)
    evaluator.state.metrics["val_mAP"]                        # the selected value (a float)
    evaluator.state.metrics["AP_IoU_0.10_MaxDet_100"]         # every other COCO value, MONAI's names

Engine output expected by the default ``output_transform`` (`detection_output_transform`): either one dict
``{"pred": [detection dict, ...], "label": [target dict, ...]}`` with one entry per image of the batch, or
a list of per-image dicts ``{"pred": detection dict, "label": target dict}`` (a decollated MONAI engine
output). Detection dicts have ``"box"`` [N, 6], ``"label"`` [N], ``"label_scores"`` [N]; target dicts
``"box"`` [G, 6], ``"label"`` [G]; boxes in ``box_mode`` (voxel `xyzxyz` by default), tensors or arrays.

Under distributed data parallel each rank keeps its own images; `compute` gathers all of them
(`ignite.distributed.all_gather` of Python objects) and every rank computes the same values. A
`DistributedSampler` that pads the last batch repeats a few images: the metric then counts them twice, as
any ignite metric would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import ignite.distributed as idist
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from meddet.metrics.coco import coco_metrics, detections_to_numpy

__all__ = ["DetectionMAP", "detection_output_transform"]


def detection_output_transform(output) -> tuple[list[dict], list[dict]]:
    """Engine output -> (per-image detection dicts, per-image target dicts); formats in the module docstring."""
    if isinstance(output, Mapping) and "pred" in output and "label" in output:
        preds, targets = output["pred"], output["label"]
        if isinstance(preds, Mapping):  # a single image
            return [preds], [targets]
        return list(preds), list(targets)
    if isinstance(output, Sequence) and all(isinstance(o, Mapping) and "pred" in o and "label" in o for o in output):
        return [o["pred"] for o in output], [o["label"] for o in output]
    raise ValueError(
        "engine output must be {'pred': [detections per image], 'label': [targets per image]} or a list of "
        f"per-image {{'pred': ..., 'label': ...}} dicts; got {type(output).__name__}"
        + (f" with keys {sorted(output)}" if isinstance(output, Mapping) else "")
    )


class DetectionMAP(Metric):
    """COCO metrics over all images seen in an epoch; the value is one of them, by default the mAP.

    Args:
        class_names: one name per class id.
        metric_key: which COCO value `compute` returns (MONAI's key names).
        box_mode: MONAI mode of predicted and target boxes.
        iou_list, iou_range, max_detection: as `meddet.metrics.coco_metrics`.
        add_details: also write every COCO value into ``engine.state.metrics`` under its own key.
        output_transform: engine output -> (detections, targets); default `detection_output_transform`.
        device: kept for ignite's interface; the accumulated data lives on the CPU as numpy arrays.
    """

    def __init__(
        self,
        class_names: Sequence[str] = ("lesion",),
        metric_key: str = "mAP_IoU_0.10_0.50_0.05_MaxDet_100",
        box_mode: str = "xyzxyz",
        iou_list: Sequence[float] = (0.1, 0.5),
        iou_range: Sequence[float] = (0.1, 0.5, 0.05),
        max_detection: Sequence[int] = (100,),
        add_details: bool = True,
        output_transform: Callable = detection_output_transform,
        device="cpu",
    ):
        self.class_names = list(class_names)
        self.metric_key = metric_key
        self.box_mode = box_mode
        self.coco_kwargs = {"iou_list": iou_list, "iou_range": iou_range, "max_detection": max_detection}
        self.add_details = add_details
        self.details: dict[str, float] = {}
        self._pairs: list[tuple[dict, dict]] = []
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        self._pairs = []
        self.details = {}

    @reinit__is_reduced
    def update(self, output) -> None:
        """Add one batch: ``output = (detections, targets)``, lists aligned per image (or one dict each)."""
        preds, targets = output
        if isinstance(preds, Mapping):
            preds, targets = [preds], [targets]
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} detection dicts but {len(targets)} target dicts in one batch")
        # numpy copies on the CPU: small, picklable for the gather, free of the engine's GPU tensors
        preds = detections_to_numpy(preds, "prediction", self.box_mode)
        targets = detections_to_numpy(targets, "ground truth", self.box_mode)
        self._pairs.extend(zip(preds, targets))

    def compute(self) -> float:
        pairs = [pair for rank_pairs in idist.all_gather(self._pairs) for pair in rank_pairs]
        if not pairs:
            raise NotComputableError("DetectionMAP needs at least one image before it can be computed")
        self.details = coco_metrics(
            [p for p, _ in pairs], [t for _, t in pairs], self.class_names, box_mode="xyzxyz", **self.coco_kwargs
        )
        if self.metric_key not in self.details:
            raise KeyError(f"metric_key {self.metric_key!r} is not a COCO value; available: {sorted(self.details)}")
        return self.details[self.metric_key]

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        if self.add_details:
            engine.state.metrics.update(self.details)
