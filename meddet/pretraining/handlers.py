"""Ignite handlers of the pre-training bundles: validation with reconstruction pictures, and the checkpoint in the
released nnssl format that every detection bundle's `pretrained_checkpoint` takes."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from meddet.engines.steps import flatten_samples
from meddet.networks.wrappers import unwrap
from meddet.pretrained.nnssl import encoder_state_dict, make_nnssl_checkpoint, read_checkpoint, strict_load
from meddet.pretraining.architecture import ARCH_CLASS_NAME, ARCH_KWARGS_REQUIRING_IMPORT, build_resenc_unet

logger = logging.getLogger(__name__)

__all__ = ["NnsslCheckpointWriter", "PretrainingValidation", "load_pretraining_weights", "save_reconstruction_png"]


def save_reconstruction_png(image: torch.Tensor, masked: torch.Tensor, reconstruction: torch.Tensor,
                            path: str, title: str = "") -> str:
    """Input, masked input and reconstruction (`[C, X, Y, Z]`, first channel) through the middle axial slice,
    side by side in one intensity window. Drawn on an Agg canvas (no window, pyplot untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [t.detach().float().cpu()[0] for t in (image, masked, reconstruction)]
    z = panels[0].shape[2] // 2
    low, high = np.percentile(panels[0].numpy(), [0.5, 99.5])
    figure = Figure(figsize=(9.6, 3.6))
    FigureCanvasAgg(figure)
    for index, (panel, name) in enumerate(zip(panels, ("input", "masked input", "reconstruction"))):
        axis = figure.add_subplot(1, 3, index + 1)
        axis.imshow(panel[:, :, z].numpy().T, cmap="gray", vmin=low, vmax=max(high, low + 1e-3), origin="lower")
        axis.set_title(name)
        axis.axis("off")
    if title:
        figure.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=80)
    return path


class PretrainingValidation:
    """Mean objective over the validation patches with fixed random masks (seed 0), every `interval` epochs of
    the engine it is attached to and when it completes (rank 0 only). Logs it, stores it in
    `engine.state.metrics` (`val_loss`, and `val_accuracy` for SimCLR), adds it to TensorBoard under
    `<output_dir>/tensorboard`, and for reconstruction objectives saves input / masked / reconstruction of the
    first validation patch as `<output_dir>/reconstruction/epoch_XXXX.png` (and a TensorBoard image).
    `run()` does the same once without an engine (the bundle's evaluate.json) and writes `metrics.json`.
    """

    def __init__(self, network: nn.Module, objective, data_loader, output_dir: str, device="cpu",
                 interval: int = 1, amp: bool = False):
        self.network, self.objective, self.data_loader = network, objective, data_loader
        self.output_dir, self.device, self.interval, self.amp = output_dir, torch.device(device), int(interval), amp
        self._writer = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._final)

    def _final(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval:
            self(engine)

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=os.path.join(self.output_dir, "tensorboard"))
        return self._writer

    @torch.no_grad()
    def evaluate(self, epoch: int = 0) -> dict:
        network = unwrap(self.network)
        was_training = network.training
        network.eval()
        generator = torch.Generator().manual_seed(0)
        totals: dict[str, float] = {}
        count, preview = 0, None
        for batch in self.data_loader:
            samples = flatten_samples(batch)
            with torch.autocast(self.device.type, enabled=bool(self.amp) and self.device.type == "cuda"):
                outputs = self.objective(network, samples, self.device, generator=generator)
            for key, value in outputs.items():
                if value.numel() == 1:
                    totals[key] = totals.get(key, 0.0) + float(value) * len(samples)
            count += len(samples)
            if preview is None and "reconstruction" in outputs:
                preview = [outputs[k][0] for k in ("image", "masked", "reconstruction")]
        network.train(was_training)
        if count == 0:
            raise ValueError("PretrainingValidation: the validation data loader is empty")
        metrics = {f"val_{key}": total / count for key, total in totals.items()}
        if preview is not None:
            path = os.path.join(self.output_dir, "reconstruction", f"epoch_{epoch:04d}.png")
            save_reconstruction_png(*preview, path, title=f"epoch {epoch}, masked MSE {metrics['val_loss']:.4f}")
            metrics["reconstruction_png"] = path
        return metrics

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        epoch = engine.state.epoch
        metrics = self.evaluate(epoch)
        engine.state.metrics.update({k: v for k, v in metrics.items() if isinstance(v, float)})
        writer = self._tensorboard()
        for key, value in metrics.items():
            if isinstance(value, float):
                writer.add_scalar(key, value, engine.state.iteration)
        if "reconstruction_png" in metrics:
            import matplotlib.image

            picture = matplotlib.image.imread(metrics["reconstruction_png"])[..., :3]
            writer.add_image("reconstruction", picture, engine.state.iteration, dataformats="HWC")
        writer.flush()
        logger.info("epoch %d validation: %s", epoch,
                    ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

    def run(self) -> dict:
        metrics = self.evaluate()
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        logger.info("validation: %s", json.dumps(metrics))
        return metrics


class NnsslCheckpointWriter:
    """When the run completes (rank 0), write the network as `<ckpt_dir>/checkpoint_final.pth` in the released
    nnssl format (`network_weights` + `nnssl_adaptation_plan`, see `meddet.pretrained.nnssl`), then check that its
    stem and stages strict-load into an encoder freshly built from the plan's `arch_kwargs` (what nnssl's
    `verify_adaptation_plans` checks before training; here the file itself is checked)."""

    def __init__(self, network: nn.Module, ckpt_dir: str, arch_kwargs: Mapping, pretrain_patch_size: Sequence[int],
                 spacing: Sequence[float] | None, intensity_normalization: str = "zscore",
                 recommended_downstream_patchsize: Sequence[int] = (160, 160, 160), method: str = "MAE",
                 filename: str = "checkpoint_final.pth"):
        self.network = network
        self.path = os.path.join(ckpt_dir, filename)
        self.arch_kwargs = dict(arch_kwargs)
        self.pretrain_patch_size = [int(p) for p in pretrain_patch_size]
        self.spacing = spacing
        self.normalization = "ZScoreNormalization" if intensity_normalization == "zscore" else "CTNormalization"
        self.recommended_downstream_patchsize = [int(p) for p in recommended_downstream_patchsize]
        self.method = method

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        self.write(epoch=engine.state.epoch, iteration=engine.state.iteration)

    def write(self, epoch: int = 0, iteration: int = 0) -> str:
        make_nnssl_checkpoint(
            unwrap(self.network).state_dict(), self.path, self.arch_kwargs, arch_class_name=ARCH_CLASS_NAME,
            pretrain_patch_size=self.pretrain_patch_size,
            pretrain_spacing=None if self.spacing is None else [float(s) for s in self.spacing],
            normalization_schemes=(self.normalization,),
            recommended_downstream_patchsize=self.recommended_downstream_patchsize,
            arch_kwargs_requiring_import=ARCH_KWARGS_REQUIRING_IMPORT,
            extra={"trainer_name": f"meddet {self.method} pre-training", "current_epoch": int(epoch),
                   "current_iteration": int(iteration)},
        )
        checkpoint = read_checkpoint(self.path)
        fresh = build_resenc_unet(checkpoint["nnssl_adaptation_plan"]["architecture_plans"]["arch_kwargs"]).encoder
        tensors, parameters = strict_load(fresh, encoder_state_dict(checkpoint, source=self.path), self.path)
        logger.info("wrote %s (%s pre-training, epoch %d): %d encoder tensors, %.3f M parameters re-load into a "
                    "freshly built encoder", self.path, self.method, epoch, tensors, parameters / 1e6)
        return self.path


def load_pretraining_weights(network: nn.Module, checkpoint_path: str) -> nn.Module:
    """Strict-load a pre-training checkpoint's `network_weights` back into the pre-training network it came
    from (evaluate.json); a mismatch names the file and the first offending key."""
    checkpoint = read_checkpoint(checkpoint_path)
    strict_load(unwrap(network), checkpoint["network_weights"], checkpoint_path)
    return network
