"""Ignite handlers of the detection workflows: resumable checkpoints and prediction/evaluation outputs."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from meddet.data.image_io import image_stem
from meddet.inference.plots import save_detection_png
from meddet.metrics.report import evaluate_files

logger = logging.getLogger(__name__)


def _state_dict(obj):
    module = getattr(obj, "module", None)  # DistributedDataParallel / DataParallel wrappers
    return (module if isinstance(module, torch.nn.Module) else obj).state_dict()


def _load_state_dict(obj, state) -> None:
    module = getattr(obj, "module", None)
    (module if isinstance(module, torch.nn.Module) else obj).load_state_dict(state)


class LatestCheckpoint:
    """Keep one resumable checkpoint `<ckpt_dir>/<filename>` of `objects` (model, optimizer, lr_scheduler...)
    plus the state of the engine it is attached to (under "trainer": epoch, iteration), and resume from it
    when the run starts. The engine is taken at `attach` time because a config cannot reference the trainer
    from inside the trainer's own handler list.

    Saved every `interval` iterations, when the run completes and when it is interrupted by an exception
    (so a killed or crashed run loses at most `interval` iterations). Writes go to a temporary file that is
    renamed over the previous checkpoint, so a crash during the write never destroys the last good one.
    Only rank 0 writes; every rank loads.
    """

    def __init__(self, ckpt_dir: str, objects: Mapping[str, object], interval: int = 500,
                 filename: str = "checkpoint_latest.pt", resume: bool = True):
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.path = os.path.join(ckpt_dir, filename)
        self.objects = dict(objects)
        self.interval = int(interval)
        self.resume = resume

    def attach(self, engine: Engine) -> None:
        self.objects["trainer"] = engine
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._save_on_exception)

    def save(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        payload = {name: _state_dict(obj) for name, obj in self.objects.items()}
        tmp = self.path + ".tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.path)

    def _save_on_exception(self, engine: Engine, error: Exception) -> None:
        if engine.state.iteration > 0:
            self.save(engine)
        raise error

    def load(self, engine: Engine) -> None:
        if not os.path.exists(self.path):
            return
        payload = torch.load(self.path, map_location="cpu", weights_only=True)
        max_epochs = engine.state.max_epochs
        for name, obj in self.objects.items():
            if name not in payload:
                raise KeyError(f"{self.path} has no '{name}' entry (has: {sorted(payload)}); "
                               "delete it to start a new run")
            _load_state_dict(obj, payload[name])
        # the configured length of the run wins over the stored one, so a finished run can be extended
        engine.state.max_epochs = max_epochs
        logger.info("resumed from %s at epoch %d, iteration %d", self.path, engine.state.epoch, engine.state.iteration)


class PredictionWriter:
    """Collect the detections of an evaluator run and write them as `predictions.json` (world `cccwhd` mm).

    `postprocessing` maps {"image": preprocessed MetaTensor, "box": voxel boxes, "label", "label_scores"} to
    world boxes (the bundle's `postprocessing`). With `save_png`, one PNG per case is written to
    `<output_dir>/png/` with the boxes drawn on slices through each detection.
    """

    def __init__(self, output_dir: str, postprocessing: Callable, filename: str = "predictions.json",
                 save_png: bool = False, png_score_min: float = 0.1):
        self.output_dir = output_dir
        self.postprocessing = postprocessing
        self.filename = filename
        self.save_png = save_png
        self.png_score_min = png_score_min
        self.records: list[dict] = []

    @property
    def path(self) -> str:
        return os.path.join(self.output_dir, self.filename)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.records = []

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        targets = output.get("label") or [None] * len(output["pred"])
        for image, prediction, target in zip(output["image"], output["pred"], targets):
            world = self.postprocessing({"image": image, **prediction})
            source = image.meta.get("filename_or_obj", "")
            source = source[0] if isinstance(source, (list, tuple)) else source
            self.records.append({
                "image": str(source),
                "box": torch.as_tensor(world["box"]).reshape(-1, 6).tolist(),
                "label": torch.as_tensor(prediction["label"]).reshape(-1).tolist(),
                "label_scores": torch.as_tensor(prediction["label_scores"]).reshape(-1).tolist(),
            })
            if self.save_png:
                self._png(image, prediction, target, str(source))

    def _png(self, image, prediction: dict, target: dict | None, source: str) -> None:
        stem = image_stem(source) or f"case_{len(self.records)}"
        save_detection_png(image.detach().cpu(), prediction, os.path.join(self.output_dir, "png", f"{stem}.png"),
                           ground_truth=target, score_min=self.png_score_min)

    def _write(self, engine: Engine) -> None:
        records = self.records
        if idist.get_world_size() > 1:
            records = [r for part in idist.all_gather(records) for r in part]
        if idist.get_rank() != 0:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        records = sorted(records, key=lambda r: r["image"])
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, self.path)
        logger.info("wrote %d predictions to %s", len(records), self.path)


class EvaluationReport:
    """After an evaluator run, score `predictions.json` against the datalist: metrics.json, per_case.csv,
    froc.png under `output_dir` (see `meddet.metrics.report.evaluate_files`)."""

    def __init__(self, prediction_file: str, data_list_file_path: str, output_dir: str,
                 data_list_key: str = "validation", dataset_dir: str | None = None,
                 class_names: Sequence[str] = ("lesion",), froc_criterion: str = "iou"):
        self.kwargs = dict(predictions_json=prediction_file, data_list_file_path=data_list_file_path,
                           output_dir=output_dir, data_list_key=data_list_key, dataset_dir=dataset_dir,
                           class_names=tuple(class_names), froc_criterion=froc_criterion)
        self.metrics: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        self.metrics = evaluate_files(**self.kwargs)
        headline = {k: v for k, v in self.metrics.items()
                    if k in ("AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "froc_score")}
        logger.info("evaluation: %s", json.dumps(headline))
