"""Training and evaluation workflows: iteration steps for MONAI engines, schedules, handlers."""

from meddet.engines.handlers import (
    BestModelMemory,
    EvaluationReport,
    LatestCheckpoint,
    PredictionWriter,
    RandomStates,
    handlers_for_this_rank,
)
from meddet.engines.optim import parameter_groups
from meddet.engines.schedulers import WarmupPoly, warmup_poly_scheduler
from meddet.engines.steps import (
    DetectionTrainStep,
    detection_eval_step,
    detection_train_step,
    flatten_samples,
    optimisation_step,
)

__all__ = [
    "DetectionTrainStep",
    "EvaluationReport",
    "BestModelMemory",
    "LatestCheckpoint",
    "RandomStates",
    "PredictionWriter",
    "WarmupPoly",
    "detection_eval_step",
    "detection_train_step",
    "flatten_samples",
    "handlers_for_this_rank",
    "optimisation_step",
    "parameter_groups",
    "warmup_poly_scheduler",
]
