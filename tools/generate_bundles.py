"""Render every bundle of the collection from the variant table (`tools/variants.py`).

    python tools/generate_bundles.py            # (re)write bundles/<name>/ for every variant
    python tools/generate_bundles.py --check    # exit 1 when a committed bundle differs from the table

Also renders the benchmark table of the collection README (between `<!-- benchmarks -->` markers) from the same
table's measured figures. Only the files rendered here are owned by the generator; `models/` (trained weights, downloaded
checkpoints) and `eval/` are left alone. The collection's `bundle_index.json` is written by `tools/package.py`
(it holds the checksums of the packaged zips).
"""

from __future__ import annotations

import json
import os
import sys

import fire

import bundle_templates as configs
import pretraining_templates
from bundle_docs import benchmarks_table, metadata, readme
from bundle_files import APACHE_NOTICE, LOGGING_CONF, large_files
from variants import VARIANTS


def render_detection(variant: dict) -> dict:
    """Relative path -> content (dict/list for JSON, str for text) of every generated file of a detection bundle."""
    files = {
        "configs/metadata.json": metadata(variant),
        "configs/train.json": configs.train_config(variant),
        "configs/evaluate.json": configs.evaluate_config(variant),
        "configs/inference.json": configs.inference_config(variant),
        "configs/multi_gpu_train.json": configs.multi_gpu_config(variant),
        "configs/smoke.json": configs.smoke_config(variant),
        "configs/logging.conf": LOGGING_CONF,
        "docs/README.md": readme(variant),
        "LICENSE": APACHE_NOTICE.format(year=2026, weights_note=""),
    }
    weights = large_files(configs.pretraining(variant))
    if weights:
        files["large_files.yml"] = weights
    return files


RENDERERS = {"detection": render_detection, "pretraining": pretraining_templates.render}

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def render_variant(variant: dict) -> dict[str, str]:
    """Relative path -> file content for one variant."""
    files = {}
    for relative, content in RENDERERS[variant["kind"]](variant).items():
        files[relative] = json.dumps(content, indent=4) + "\n" if isinstance(content, (dict, list)) else content
    return files


def render_all(variants=VARIANTS) -> dict[str, str]:
    names = [v["name"] for v in variants]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise ValueError(f"variant table: duplicated bundle names {sorted(duplicated)}")
    files = {}
    for variant in variants:
        if variant["kind"] == "detection" and "detection" not in variant["name"]:
            raise ValueError(f"variant table: bundle name '{variant['name']}' must contain 'detection' "
                             "(MONAI Label picks the task type from the name)")
        for relative, content in render_variant(variant).items():
            files[os.path.join("bundles", variant["name"], relative)] = content
    return files


BENCHMARKS = ("<!-- benchmarks -->", "<!-- /benchmarks -->")


def readme_with_benchmarks(root: str = REPO_ROOT) -> str:
    """The collection README with its benchmark table rendered from `variants.MEASURED_SPEED` (the figures the
    bundle READMEs quote), so the two cannot drift apart."""
    path = os.path.join(root, "README.md")
    with open(path) as f:
        text = f.read()
    start, end = (text.find(marker) for marker in BENCHMARKS)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no {BENCHMARKS[0]} ... {BENCHMARKS[1]} block for the benchmark table")
    return text[:start + len(BENCHMARKS[0])] + "\n" + benchmarks_table() + "\n" + text[end:]


def differences(root: str = REPO_ROOT, variants=VARIANTS) -> list[str]:
    """Paths whose committed content differs from the rendering (missing files included)."""
    stale = []
    with open(os.path.join(root, "README.md")) as f:
        if f.read() != readme_with_benchmarks(root):
            stale.append("README.md (benchmark table differs)")
    for relative, content in render_all(variants).items():
        path = os.path.join(root, relative)
        if not os.path.exists(path):
            stale.append(f"{relative} (missing)")
            continue
        with open(path) as f:
            if f.read() != content:
                stale.append(f"{relative} (differs)")
    return stale


def main(check: bool = False, root: str = REPO_ROOT) -> None:
    if check:
        stale = differences(root)
        if stale:
            print("bundles differ from tools/variants.py; run `python tools/generate_bundles.py`:")
            print("\n".join(f"  {line}" for line in stale))
            sys.exit(1)
        print(f"{len(VARIANTS)} bundles match the variant table")
        return
    readme = readme_with_benchmarks(root)
    with open(os.path.join(root, "README.md"), "w") as f:
        f.write(readme)
    for relative, content in render_all().items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content)
    print(f"rendered {len(VARIANTS)} bundles under {os.path.join(root, 'bundles')}")


if __name__ == "__main__":
    fire.Fire(main)
