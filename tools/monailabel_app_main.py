"""MONAI Label app serving this collection's detection bundles (copied to `<app_dir>/main.py` by
`tools/monailabel_app.py`; runs inside MONAI Label's environment, not meddet's).

Every folder under `<app_dir>/model/` is one bundle, served under its folder name: an inference task
(`BundleInferTask`: world boxes -> a 3D Slicer ROI JSON in LPS) and, unless `--conf skip_trainers true`, a
training task (`BundleTrainTask`: the datastore's ROI JSON labels -> `models/model.pt`).
"""

from __future__ import annotations

import logging
import os

from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

logger = logging.getLogger(__name__)


class DetectionBundlesApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict):
        model_dir = os.path.join(app_dir, "model")
        self.bundles = {name: os.path.join(model_dir, name) for name in sorted(os.listdir(model_dir))
                        if os.path.isfile(os.path.join(model_dir, name, "configs", "inference.json"))}
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="meddet detection bundles",
                         description="3D lesion detectors (Retina U-Net, Deformable DETR) as MONAI Bundles",
                         version="1")

    def init_infers(self) -> dict:
        return {name: BundleInferTask(path, self.conf) for name, path in self.bundles.items()}

    def init_trainers(self) -> dict:
        if str(self.conf.get("skip_trainers", "false")).lower() == "true":
            return {}
        trainers = {}
        for name, path in self.bundles.items():
            task = BundleTrainTask(path, self.conf)
            if task.is_valid():
                trainers[name] = task
            else:
                logger.warning(f"{name}: no valid configs/train.json, served for inference only")
        return trainers

    def init_strategies(self) -> dict:
        # 3D Slicer's "Next Sample" asks for one of these
        return {"random": Random(), "first": First()}
