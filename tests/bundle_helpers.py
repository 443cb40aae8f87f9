"""Shared helpers of the bundle tests: synthetic data, planning, and `monai.bundle` runs."""

from __future__ import annotations

import json
import os
import subprocess

import plan as planning
from quickstart import bundle_command

from meddet.data.synthetic import generate_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_chain(error: BaseException) -> str:
    """MONAI wraps errors raised inside config expressions; the user sees the whole chain, so do the tests."""
    messages = []
    while error is not None:
        messages.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def bundle_dir(name: str) -> str:
    return os.path.join(REPO, "bundles", name)


def smoke_settings(name: str) -> dict:
    with open(os.path.join(bundle_dir(name), "configs", "smoke.json")) as f:
        return json.load(f)


def easy_dataset_with_plans(root: str, name: str, seed: int = 0, **generate_kwargs) -> tuple[str, str, str]:
    """(data_dir, datalist, plans) for the easy synthetic preset, planned for the bundle's smoke network."""
    data_dir = os.path.join(root, "data")
    datalist = generate_dataset(data_dir, preset="easy", seed=seed, **generate_kwargs)
    levels = len(smoke_settings(name)["detection_levels"])
    plans = os.path.join(root, "plans.json")
    planning.plan(datalist, data_dir, plans, level_scales=[2 ** i for i in range(levels)], anchors_per_axis=2,
                  patch_size=smoke_settings(name)["patch_size"])
    return data_dir, datalist, plans


def run_bundle(name: str, configs: list[str], log_path: str, launcher: list[str] | None = None,
               timeout: int = 1500, **overrides) -> subprocess.CompletedProcess:
    """Run `python -m monai.bundle run` (or under `launcher`, e.g. torchrun) from the bundle folder."""
    command = bundle_command(bundle_dir(name), configs, **overrides)
    if launcher:
        command = launcher + command[1:]  # the launcher replaces `python`
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=bundle_dir(name), stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout, env=env)
    if result.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            raise AssertionError(f"{' '.join(command)} failed:\n{log.read()[-5000:]}")
    return result
