"""Quickstart: synthetic data -> plan -> train (smoke preset) -> evaluate -> inference, with the standard
`python -m monai.bundle run` commands a user would type.

    python tools/quickstart.py [--work_dir quickstart] [--bundle retinaunet_resencl_scratch_detection]
    python tools/quickstart.py --init mae     # pre-train (smoke) -> fine-tune retinaunet_resencl_mae_detection

Prints AP@0.1, mAP@[0.1:0.5] and the FROC score of the validation split and where the PNGs are.
Everything is written under `work_dir`; the bundle folder in the repository is not modified.
With `--init mae` (or `simclr`) the encoder is first pre-trained by `resencl_<init>_pretraining`'s smoke preset on
the training images (their boxes unused), and the pre-trained detection bundle fine-tunes from that checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import fire

import plan as planning

from meddet.data.synthetic import generate_dataset

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bundle_command(bundle_dir: str, configs: list[str], **overrides) -> list[str]:
    """`python -m monai.bundle run` with a list of config files and `--key value` overrides."""
    files = "[" + ",".join(f"'{c}'" for c in configs) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files,
               "--logging_file", os.path.join(bundle_dir, "configs", "logging.conf")]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def _run(command: list[str], cwd: str, log_path: str) -> float:
    # printed the way one would type it: the config list in double quotes, everything else plain
    print("$ " + " ".join(f'"{c}"' if c.startswith("[") else shlex.quote(c) for c in command), flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            tail = log.read()[-4000:]
        raise SystemExit(f"command failed (exit {result.returncode}); last lines of {log_path}:\n{tail}")
    seconds = time.time() - start
    print(f"  done in {seconds:.0f} s (log: {log_path})", flush=True)
    return seconds


PRETRAINED_BUNDLE = {"mae": "retinaunet_resencl_mae_detection", "simclr": "retinaunet_resencl_voco_detection"}


def quickstart(work_dir: str = "quickstart", bundle: str | None = None, preset: str = "easy", seed: int = 0,
               init: str = "scratch") -> None:
    """The command line: run the quickstart and print what it measured."""
    run_quickstart(work_dir, bundle, preset, seed, init)


def run_quickstart(work_dir: str = "quickstart", bundle: str | None = None, preset: str = "easy", seed: int = 0,
                   init: str = "scratch") -> dict:
    """Run the quickstart; return its wall time (total and per bundle step, seconds) and validation metrics."""
    started = time.time()
    if init not in ("scratch", *PRETRAINED_BUNDLE):
        raise SystemExit(f"--init must be scratch, {' or '.join(PRETRAINED_BUNDLE)}; got {init!r}")
    bundle = bundle or PRETRAINED_BUNDLE.get(init, "retinaunet_resencl_scratch_detection")
    work_dir = os.path.abspath(work_dir)
    bundle_dir = os.path.join(REPO_ROOT, "bundles", bundle)
    if not os.path.isdir(bundle_dir):
        raise SystemExit(f"no bundle {bundle_dir}")
    data_dir = os.path.join(work_dir, "data")
    run_dir = os.path.join(work_dir, "run")
    os.makedirs(run_dir, exist_ok=True)

    steps = 5 if init == "scratch" else 6
    step = iter(range(1, steps + 1))
    print(f"{next(step)}/{steps} synthetic '{preset}' dataset -> {data_dir}", flush=True)
    datalist = generate_dataset(data_dir, preset=preset, seed=seed)

    print(f"{next(step)}/{steps} planning spacing, intensities and anchors from the training split", flush=True)
    with open(os.path.join(bundle_dir, "configs", "smoke.json")) as f:
        smoke = json.load(f)
    level_scales = [2 ** i for i in range(len(smoke["detection_levels"]))]
    plans_path = os.path.join(work_dir, "plans.json")
    planning.plan(datalist, data_dir, plans_path, level_scales=level_scales, anchors_per_axis=2,
                  patch_size=smoke["patch_size"])

    common = dict(bundle_root=run_dir, dataset_dir=data_dir, data_list_file_path=datalist)
    smoke_configs = ["configs/smoke.json", plans_path]
    training, seconds = {}, {}
    if init != "scratch":
        pretraining_dir = os.path.join(REPO_ROOT, "bundles", f"resencl_{init}_pretraining")
        pretraining_root = os.path.join(work_dir, f"pretrain_{init}")
        print(f"{next(step)}/{steps} pre-training the encoder ({init}, smoke preset) on the training images",
              flush=True)
        seconds["pretraining"] = _run(
            bundle_command(pretraining_dir, ["configs/train.json", *smoke_configs], bundle_root=pretraining_root,
                           dataset_dir=data_dir, data_list_file_path=datalist),
            pretraining_dir, os.path.join(work_dir, "pretrain.log"))
        training["pretrained_checkpoint"] = os.path.join(pretraining_root, "models", "checkpoint_final.pth")
    print(f"{next(step)}/{steps} training (smoke preset)", flush=True)
    seconds["training"] = _run(bundle_command(bundle_dir, ["configs/train.json", *smoke_configs], **common, **training),
                               bundle_dir, os.path.join(work_dir, "train.log"))
    print(f"{next(step)}/{steps} evaluating the best checkpoint on the validation split", flush=True)
    seconds["evaluation"] = _run(
        bundle_command(bundle_dir, ["configs/train.json", "configs/evaluate.json", *smoke_configs], **common),
        bundle_dir, os.path.join(work_dir, "evaluate.log"))
    print(f"{next(step)}/{steps} inference on the validation images", flush=True)
    seconds["inference"] = _run(
        bundle_command(bundle_dir, ["configs/inference.json", *smoke_configs], save_png=True,
                       output_dir=os.path.join(run_dir, "inference"), **common),
        bundle_dir, os.path.join(work_dir, "inference.log"))

    with open(os.path.join(run_dir, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    print()
    print(f"AP@0.1               {metrics['AP_IoU_0.10_MaxDet_100']:.3f}")
    print(f"mAP@[0.10:0.50:0.05] {metrics['mAP_IoU_0.10_0.50_0.05_MaxDet_100']:.3f}")
    print(f"FROC score           {metrics['froc_score']:.3f}")
    print(f"metrics:     {os.path.join(run_dir, 'eval', 'metrics.json')}")
    print(f"predictions: {os.path.join(run_dir, 'inference', 'predictions.json')}")
    print(f"PNGs:        {os.path.join(run_dir, 'inference', 'png')}")
    total = time.time() - started
    print(f"wall time    {total // 60:.0f} min {total % 60:.0f} s")
    return {"init": init, "bundle": bundle, "seconds": round(total, 1),
            "step_seconds": {k: round(v, 1) for k, v in seconds.items()},
            "ap_0.1": metrics["AP_IoU_0.10_MaxDet_100"], "map": metrics["mAP_IoU_0.10_0.50_0.05_MaxDet_100"],
            "froc": metrics["froc_score"]}


if __name__ == "__main__":
    fire.Fire(quickstart)
