"""Ignite handlers of the detection workflows: resumable checkpoints and prediction/evaluation outputs."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

from meddet.data.image_io import image_stem
from meddet.inference.plots import save_detection_png
from meddet.networks.wrappers import unwrap
from meddet.metrics.report import evaluate_files

logger = logging.getLogger(__name__)


def handlers_for_this_rank(handlers: Sequence) -> list:
    """`handlers` as a process of a distributed run should attach them: rank 0 all of them, the other ranks all but
    the logging ones (MONAI's StatsHandler and TensorBoardStatsHandler, ignite's ProgressBar), which would print,
    and write event files, once per process."""
    from ignite.handlers import ProgressBar
    from monai.handlers import StatsHandler, TensorBoardStatsHandler

    if idist.get_rank() == 0:
        return list(handlers)
    return [h for h in handlers if not isinstance(h, (StatsHandler, TensorBoardStatsHandler, ProgressBar))]


def _state_dict(obj):
    return unwrap(obj).state_dict()  # the model inside DistributedDataParallel / DataParallel / torch.compile


def _load_state_dict(obj, state) -> None:
    unwrap(obj).load_state_dict(state)


def _randomizable(transform) -> list:
    """Every object with its own numpy RandomState (`R`, MONAI's Randomizable) inside a transform chain, in a fixed
    order: the chain's transforms and the transforms they hold (a dictionary transform such as RandZoomBoxd draws
    from an inner array transform's generator of its own)."""
    from monai.transforms import Transform

    found, seen, stack = [], set(), [transform]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(getattr(current, "R", None), np.random.RandomState):
            found.append(current)
        children = list(getattr(current, "transforms", ()) or ())
        children += [value for value in getattr(current, "__dict__", {}).values() if isinstance(value, Transform)]
        stack.extend(reversed(children))
    return found


def _numpy_state(state) -> dict:
    name, keys, position, has_gauss, gauss = state
    return {"name": name, "keys": torch.as_tensor(np.asarray(keys, dtype=np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _numpy_tuple(state: dict) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["position"], state["has_gauss"],
            state["gauss"])


class RandomStates:
    """The random number generators a training run draws from, as one checkpointable object: torch's (CPU and,
    when present, CUDA), numpy's and Python's global generators and the own generator of every random transform in
    `transforms` (the training chain). Restored on resume, a run continued where a pass over the training data ended,
    with the data loaded in the main process (``num_workers`` 0), repeats the uninterrupted run exactly on CPU. Not
    restored: loader worker processes (re-seeded from torch's generator for every pass, so their augmentations
    differ after a resume) and the order of a pass interrupted midway (its remaining batches draw a fresh order).
    """

    def __init__(self, transforms=None):
        self.transforms = _randomizable(transforms) if transforms is not None else []

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(np.random.get_state()),
                 "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
                 "transforms": [_numpy_state(t.R.get_state()) for t in self.transforms]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(_numpy_tuple(state["numpy"]))
        random.setstate((state["python_version"], tuple(state["python"]), None))
        if len(state["transforms"]) == len(self.transforms):
            for transform, saved in zip(self.transforms, state["transforms"]):
                transform.R.set_state(_numpy_tuple(saved))
        else:
            logger.warning("the training transforms changed since the checkpoint (%d random transforms, %d saved): "
                           "their random states start afresh", len(self.transforms), len(state["transforms"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class BestModelMemory:
    """What the best-model saver remembers, as one checkpointable object: the evaluator's best metric and its
    epoch, and the list of saved best checkpoints of MONAI's `CheckpointSaver` (`save_key_metric`). Without it a
    resumed run forgets the best score and its next validation, however poor, replaces ``model.pt``."""

    def __init__(self, evaluator, saver=None):
        self.evaluator = evaluator
        self.saver = saver

    def state_dict(self) -> dict:
        state = {"best_metric": float(self.evaluator.state.best_metric),
                 "best_metric_epoch": int(self.evaluator.state.best_metric_epoch)}
        tracker = getattr(self.saver, "_key_metric_checkpoint", None)
        if tracker is not None:
            state["saved"] = [[float(item.priority), str(item.filename)] for item in tracker._saved]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        if self.saver is not None and state.get("saved"):
            self.saver.load_state_dict({"_saved": [tuple(item) for item in state["saved"]]})


#: checkpoint entries a resume can do without (checkpoints written before they existed)
OPTIONAL_STATES = ("random_states", "best_model")


class LatestCheckpoint:
    """Keep one resumable checkpoint `<ckpt_dir>/<filename>` of `objects` (model, optimizer, lr_scheduler...)
    plus the state of the engine it is attached to (under "trainer": epoch, iteration), and resume from it
    when the run starts. The engine is taken at `attach` time because a config cannot reference the trainer
    from inside the trainer's own handler list.

    Saved every `interval` iterations, when the run completes and when it is interrupted by an exception
    (so a killed or crashed run loses at most `interval` iterations). Writes go to a temporary file that is
    renamed over the previous checkpoint, and the one it replaces is kept as `<filename stem>_previous.pt`: a
    crash during the write never destroys the last good checkpoint, and a latest checkpoint that cannot be read
    (a damaged disk, a copy cut short) falls back to the previous one with a warning. Only rank 0 writes; every
    rank loads. Objects with `state_dict`/`load_state_dict` can be added, e.g. `RandomStates` and
    `BestModelMemory`, so that a resumed run continues the uninterrupted one.
    """

    def __init__(self, ckpt_dir: str, objects: Mapping[str, object], interval: int = 500,
                 filename: str = "checkpoint_latest.pt", resume: bool = True):
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.path = os.path.join(ckpt_dir, filename)
        stem, suffix = os.path.splitext(filename)
        self.previous_path = os.path.join(ckpt_dir, f"{stem.replace('_latest', '')}_previous{suffix}")
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
        if os.path.exists(self.path):
            os.replace(self.path, self.previous_path)
        os.replace(tmp, self.path)

    def _save_on_exception(self, engine: Engine, error: Exception) -> None:
        if engine.state.iteration > 0:
            self.save(engine)
        raise error

    def _read(self) -> dict | None:
        """The payload of the latest checkpoint, else of the previous one (with a warning); None when neither
        exists; a clear error when none that exists can be read."""
        failures = []
        for path in (self.path, self.previous_path):
            if not os.path.exists(path):
                continue
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # any unreadable file: say which, and what to do
                failures.append(f"{path} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
                continue
            if failures:
                logger.warning("cannot read %s; resuming from the previous checkpoint %s instead", failures[0], path)
            return payload
        if failures:
            raise RuntimeError(
                "cannot resume: " + "; ".join(failures) + " cannot be read as a checkpoint. Rename or delete it to "
                "start the run afresh (models/model.pt, the best model so far, is not touched)")
        return None

    def load(self, engine: Engine) -> None:
        payload = self._read()
        if payload is None:
            return
        max_epochs = engine.state.max_epochs
        for name, obj in self.objects.items():
            if name not in payload:
                if name in OPTIONAL_STATES:
                    logger.warning("%s has no '%s' entry (an older checkpoint): it starts afresh", self.path, name)
                    continue
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
                           ground_truth=target, score_min=self.png_score_min, name=stem)

    def _write(self, engine: Engine) -> None:
        records = self.records
        if idist.get_world_size() > 1:
            records = [r for part in idist.all_gather(records) for r in part]
        if idist.get_rank() != 0:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        records = sorted(records, key=lambda r: r["image"])
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
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
