"""What a detection bundle says about itself: `configs/metadata.json` and `docs/README.md`, their numbers read from
the variant table and from the recipe the configs are rendered with (`bundle_templates.recipe`)."""

from __future__ import annotations

from bundle_files import metadata_common
from bundle_templates import PATCH_SIZE, TRAIN_BATCH_SIZE, family, is_detr, pretraining, recipe, title
from variants import HF, MEASURED_SPEED, PAPER, SMOKE_CHECKPOINT_SOURCE, recipe_differences

PARAMETER_COUNTS = {
    # measured with one class (27 anchors / 12 queries) by the network tests; encoder counts in brackets
    "retinaunet_resencl": "95.13 M (encoder 90.30 M)",
    "retinaunet_nndet": "18.86 M (encoder 14.02 M)",
    "defdetr_resencl": "94.45 M (encoder 90.30 M)",
}


def _pretraining_metadata(variant: dict) -> dict | None:
    spec = pretraining(variant)
    if spec is None:
        return None
    return {"method": spec["method"], "kind": spec["kind"], "data": spec["data"],
            "source": HF.format(repo=spec["repo"]), "repository": f"MIC-DKFZ/{spec['repo']}",
            "license": "CC-BY-4.0", "citation": spec["citation"]}


def metadata(variant: dict) -> dict:
    spec = pretraining(variant)
    references = [PAPER]
    if is_detr(variant):
        references.append("Zhu et al., Deformable DETR: Deformable Transformers for End-to-End Object Detection, "
                          "ICLR 2021")
    else:
        references += [
            "Baumgartner et al., nnDetection: A Self-configuring Method for Medical Object Detection, MICCAI 2021",
            "Jaeger et al., Retina U-Net: Embarrassingly Simple Exploitation of Segmentation Supervision for "
            "Medical Object Detection, ML4H 2020",
        ]
    if spec:
        references.append(spec["citation"])
    return {
        **metadata_common(variant),
        "name": title(variant),
        "task": "3D lesion detection in CT",
        "description": (f"{title(variant)}: a 3D object detector returning boxes, labels and scores for lesions in "
                        "a volume, fine-tunable on your own datalist."),
        "data_source": "your own detection datalist (MONAI detection format); synthetic data for the smoke preset",
        "image_classes": "single-channel CT in Hounsfield units",
        "label_classes": "0: lesion (boxes world mm cccwhd, 0-based labels)",
        "pred_classes": "0: lesion",
        "references": references,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": [128, 128, 128],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "object",
                    "format": "cccwhd",
                    "dtype": "float32",
                    "num_channels": 1,
                    "spatial_shape": [],
                    "value_range": [],
                    "channel_def": {"0": "lesion"},
                }
            },
        },
        "meddet": {
            "kind": "detection",
            "family": variant["family"],
            "detector": family(variant)["detector"],
            "initialisation": variant["initialisation"],
            "pretraining": _pretraining_metadata(variant),
            "parameters": PARAMETER_COUNTS[variant["family"]],
        },
    }


def _number(value: float) -> str:
    """A recipe number as the paper writes it: 0.01, 3e-5, 10,000."""
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:g}"


def _recipe_text(variant: dict) -> str:
    """The recipe as prose, its numbers read from `recipe()` (the values the configs are rendered with)."""
    r = recipe(variant)
    optimizer = r["optimizer"]
    schedule = (f"{_number(r['max_epochs'])} epochs x {_number(r['epoch_length'])} iterations, "
                f"batch {TRAIN_BATCH_SIZE}, {PATCH_SIZE[0]}^3 patches")
    warmup = (f"{_number(r['warmup_iterations'])} linear warm-up iterations from 1e-6, then"
              if r["warmup_iterations"] else "no warm-up;")
    if is_detr(variant):
        return (f"AdamW (amsgrad, eps {_number(optimizer['eps'])}), lr {_number(r['learning_rate'])}, weight decay "
                f"{_number(r['weight_decay'])}, {warmup} poly 0.9 per iteration, {schedule}, gradient norm clipped at "
                f"{_number(r['clip_grad_norm'])}, AMP on CUDA. Hungarian matching (class 2, L1 5, GIoU 2); focal "
                "(gamma 1, alpha 0.75), L1 x5, GIoU x2 with auxiliary losses on every decoder layer and the encoder "
                "proposals. Top-K per patch, no NMS, then sliding-window stitching, mirror TTA and weighted box "
                "clustering.")
    return (f"SGD Nesterov (momentum {_number(r['momentum'])}), lr {_number(r['learning_rate'])}, weight decay "
            f"{_number(r['weight_decay'])} (none on norms and biases), {warmup} poly 0.9 per iteration, {schedule}, "
            "AMP on CUDA. ATSS matching (4 candidates), focal classification (gamma 1, alpha 0.75), smooth-L1 box "
            "regression, 0.5 CE + 0.5 Dice segmentation; sliding-window stitching, mirror TTA and weighted box "
            "clustering.")


def _differences_text(variant: dict) -> str:
    return "\n".join(f"- {difference}: {reason}." for difference, reason in recipe_differences(variant))


def _pretraining_text(variant: dict) -> str:
    spec = pretraining(variant)
    if spec is None:
        return ("All weights start from random initialisation (`pretrained_checkpoint` is empty). The paper finds "
                "reconstruction-pre-trained encoders (the `mae` and `s3d` bundles) better than this baseline.\n")
    url = HF.format(repo=spec["repo"])
    stem = ("\nThe checkpoint holds one stem per pre-training dataset; the CT stem is used by default, another "
            "is chosen with `--pretrained_stem <id>`.\n" if variant["initialisation"].startswith("multitalent") else "")
    return f"""The encoder (stem + stages) starts from the released **{spec['method']}** checkpoint
([MIC-DKFZ/{spec['repo']}](https://huggingface.co/MIC-DKFZ/{spec['repo']})): {spec['kind']}, pre-trained on
{spec['data']}. The decoder/FPN, transformer and heads start from random initialisation; everything is fine-tuned
(no freezing; `freeze_encoder_iterations` > 0 freezes the encoder for that many iterations as an ablation).
{stem}
Fetch the weights once (about 400 MB, CC-BY-4.0 per the model card) into `models/checkpoint_final.pth`:

    python -m monai.bundle download_large_files --bundle_path .

or download {url} there yourself. Training stops with this instruction if the file is missing; a pre-trained
bundle never trains from scratch silently. Another location: `--pretrained_checkpoint PATH`.
"""


def _smoke_note(variant: dict) -> str:
    if pretraining(variant) is None:
        return ""
    source = SMOKE_CHECKPOINT_SOURCE.get(variant["initialisation"])
    if source is None:
        return (" The smoke preset does not train from scratch either: it needs a smoke-size checkpoint in the "
                "native MultiTalent layout (`--pretrained_checkpoint PATH`), which the collection cannot pre-train.")
    return f"""
The smoke preset does not train from scratch either: it starts from a smoke-size checkpoint of the smoke encoder,
made by the smoke preset of `bundles/resencl_{source}_pretraining` and passed with `--pretrained_checkpoint PATH`
(`python tools/quickstart.py --init mae` does both steps)."""


def _speed_text(variant: dict) -> str:
    speed = MEASURED_SPEED
    lines = [
        f"- Training input: the box-aware crop draws each patch centre from the boxes (MONAI's positive/negative "
        f"distribution, without MONAI's whole-volume mask per patch). One loader worker on {speed['machine']} gives "
        f"{speed['loader_patches_per_s']:.1f} patches/s of 128^3 with every augmentation from a 450x450x190 CT "
        f"({speed['loader_monai_crop_patches_per_s']:.2f} with MONAI's `RandCropBoxByPosNegLabeld`).",
        f"- Preprocessed volumes wait in RAM (`cache_rate`). `--cache_dir DIR` keeps them on disk instead, "
        f"memory-mapped, for datasets larger than RAM (888 LUNA16 CTs of ~38 M voxels: ~135 GB as float32): "
        f"{speed['loader_disk_cache_patches_per_s']:.1f} patches/s per worker from a warm page cache. Entries are "
        "keyed by the preprocessing settings and the source files' size and time.",
    ]
    if is_detr(variant):
        lines.append("- Inference: windows of the training patch (the token grid is fixed by it), overlap "
                     "`sw_overlap`.")
    else:
        lines.append(
            "- Inference: the segmentation branch is skipped (it only trains the network); an axis shorter than the "
            "128-voxel window gets a tile of its own length rounded up to 32 instead of a padded window. Per volume "
            f"({speed['zoo_volume']}, no TTA, {speed['machine']}): {speed['inference_vs_zoo_ratio']:.2f}x the time "
            f"of the model zoo's RetinaNet (`lung_nodule_ct_detection`, whole volume in one pass), "
            f"{speed['inference_vs_zoo_ratio_before']:.2f}x before these two changes; on a volume that fits one "
            f"window (128x128x64) {speed['one_window_vs_zoo_ratio']:.2f}x. The rest is tile overlap (`sw_overlap` "
            "0.5: a 437x437x175 CT takes 72 windows, 50 at 0.25). Fewer or larger windows were measured and "
            f"rejected: on the synthetic benchmark the smoke model's AP@0.1 ({speed['whole_volume_ap'][0]:.3f} with "
            f"patch-size windows at overlap 0.5) fell to {speed['overlap_025_ap']:.3f} at overlap 0.25, to "
            f"{speed['grown_window_ap']:.3f} with windows stretched to cover axes up to 1.25x the patch, and to "
            f"{speed['whole_volume_ap'][1]:.3f} with whole-volume windows (in windows larger than its 32^3 training "
            "patches it scored false positives above the lesions).")
    lines.append(
        f"- Mirror TTA (`tta_mirror_axes`, default `[0, 1, 2]`) runs 8 passes per window: {speed['tta_cost']:.1f}x "
        "the time per volume of `--tta_mirror_axes \"[]\"`.")
    return "\n".join(lines)


def readme(variant: dict) -> str:
    name = variant["name"]
    export_note = ("last-layer `pred_logits`, `pred_boxes`; trace at the training patch size, the token grid is "
                   "fixed by it" if is_detr(variant) else
                   "classification maps, then box-regression maps (no segmentation: it is skipped at inference); any "
                   "multiple of 32 per axis with "
                   "at least one axis of 64 works (the smoke preset: multiples of 8, one axis of 16)")
    spec = pretraining(variant)
    citation = f"\n- {spec['citation']}." if spec else ""
    weights_licence = (f" The pre-trained weights ({spec['repo']}) are licensed CC-BY-4.0 by their authors."
                       if spec else "")
    planning = ("`num_queries` (max(12, 3 x the 95th percentile of objects per training patch))" if is_detr(variant)
                else "27 anchor shapes")
    return f"""# {title(variant)}

`{name}` is a MONAI Bundle of the meddet collection: {family(variant)['title']}
({PARAMETER_COUNTS[variant['family']]} parameters), fine-tuned with the release's recipe (the differences are listed under
Recipe).

## Initialisation

{_pretraining_text(variant)}
## Requirements

`pip install -e .` in the collection's repository (installs `meddet` and the packages listed in
`configs/metadata.json`).

## Data

A MONAI detection datalist: `{{"training": [{{"image": path, "box": [[cx, cy, cz, w, h, d], ...], "label": [0, ...]}}],
"validation": [...]}}`, boxes in world millimetres (`cccwhd`, RAS: the frame MONAI's readers give every format;
set `affine_lps_to_ras` to true for boxes written in LPS). An image is a `.nii(.gz)`, `.mhd`, `.nrrd` or a
DICOM series folder. Cases without boxes are valid negatives. Optional per item: `ignore_box` (no loss there
in training; detections there count neither way in evaluation) and `diameter_mm` (one per box; evaluation
then also reports the LUNA16 CPM). `python tools/luna16.py datalist` writes such datalists for LUNA16's folds.
The datalist is checked before training: missing or 2D images, NaN/Inf voxels, broken DICOM series or `.mhd`
data files, boxes outside the image or with non-positive size, box/label count mismatches and labels outside
`num_classes` are reported with the file and item.

Plan spacing, CT intensity normalisation and {planning} for your data into an override file (kept outside
this folder; `plans.json` below stands for its path):

    python tools/plan.py --data_list_file_path L --dataset_dir D --output_path P/plans.json

## Recipe

{_recipe_text(variant)}

Where this bundle departs from the paper's released recipe (what differs, and why):

{_differences_text(variant)}

## Commands (run from this folder)

Train; the best validation `mAP_IoU_0.10_0.50_0.05_MaxDet_100` is kept as `models/model.pt`. A killed run resumes
from `models/checkpoint_latest.pt` (the one before it is kept as `checkpoint_previous.pt` and used if the latest
cannot be read) with its optimizer, schedule, best score and random generators: resumed where a pass over the
training data ended, with `num_workers` 0, it repeats the uninterrupted run exactly on CPU; loader workers'
augmentations and the order of a pass interrupted midway are drawn afresh:

    python -m monai.bundle run --config_file "['configs/train.json','plans.json']" --dataset_dir D --data_list_file_path L

Evaluate `models/model.pt` on the validation split; writes `eval/predictions.json`, `eval/metrics.json` (COCO
mAP/AP/AR, FROC, and the LUNA16 CPM with `eval/luna16_froc.png` when the datalist has `diameter_mm`),
`eval/per_case.csv`, `eval/froc.png` and PNGs:

    python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json','plans.json']" --dataset_dir D --data_list_file_path L

Inference (items of `data_list_key`, default `validation`; only `image` is needed):

    python -m monai.bundle run --config_file "['configs/inference.json','plans.json']" --dataset_dir D --data_list_file_path L

Multi-GPU training:

    torchrun --nproc_per_node=2 -m monai.bundle run --config_file "['configs/train.json','configs/multi_gpu_train.json','plans.json']" --dataset_dir D --data_list_file_path L

Add `configs/smoke.json` (before `plans.json`) to any command for a tiny CPU-sized network and schedule
(minutes on 2 cores).{_smoke_note(variant)}

## Outputs

`predictions.json`: one entry per image with `image`, `box` (world mm, `cccwhd`), `label`, `label_scores`.

## Speed and memory

{_speed_text(variant)}

`python tools/benchmark.py` (in the collection's repository) measures these on your machine.

## Export

TorchScript (traced; `export_network_def` returns the network's outputs as a flat tuple, {export_note}):

    python -m monai.bundle ckpt_export --net_id export_network_def --filepath models/model.ts --ckpt_file models/model.pt --config_file configs/inference.json --use_trace True --input_shape "[1,1,128,128,128]"

`onnx_export` takes the same arguments (opset 20; needs the `onnx` package).

## MONAI Label / 3D Slicer

`python tools/monailabel_app.py prepare --app_dir APP --studies IMAGES --bundles {name}` (in the collection's repository)
prepares a MONAI Label 0.8.5 app serving this bundle to 3D Slicer, with the viewer's LPS frame set in the served
copy of `configs/inference.json` and `configs/train.json`, and prints the `monailabel start_server` command; the
collection README walks through detecting, correcting the boxes, training and detecting again. MONAI Label does
not show scores: `display_score_thresh` (in `displayable_configs`, default set by `--score_thresh`) decides which
boxes are sent.

## References

- {PAPER}.{citation}

## License

Code and configuration: Apache-2.0 (see LICENSE).{weights_licence}
"""


def benchmarks_table() -> str:
    """The collection README's benchmark table (between `<!-- benchmarks -->` markers), from `MEASURED_SPEED`."""
    speed = MEASURED_SPEED
    loader, disk, monai = (speed[k] for k in ("loader_patches_per_s", "loader_disk_cache_patches_per_s",
                                               "loader_monai_crop_patches_per_s"))
    wbc, nms = speed["wbc_10k_s"]
    rows = [
        ("training input, 128^3 patches with every augmentation from a cached 450x450x190 CT, one worker",
         f"{loader:.1f} patches/s", f"{monai:.2f} with MONAI's `RandCropBoxByPosNegLabeld`", f"{loader / monai:.1f}x"),
        ("the same, volume memory-mapped from `--cache_dir` (page cache warm)", f"{disk:.1f} patches/s", "", ""),
        (f"Retina U-Net ResEnc-L inference per {speed['zoo_volume']} volume, no TTA",
         f"{speed['ours_inference_s']:.1f} s (4 windows)",
         f"{speed['zoo_inference_s']:.1f} s, model zoo RetinaNet, one pass",
         f"{speed['inference_vs_zoo_ratio']:.2f}x ({speed['inference_vs_zoo_ratio_before']:.2f}x before skipping the "
         "segmentation branch and padding)"),
        ("the same on a volume within one window (128x128x64)", "", "", f"{speed['one_window_vs_zoo_ratio']:.2f}x"),
        ("mirror TTA (8 passes) per volume", "", "no TTA", f"{speed['tta_cost']:.1f}x"),
        ("whole-volume inference vs the bare network forward over the same tiles (smoke networks)", "", "",
         "{:.2f}x (Retina U-Net), {:.2f}x (DETR)".format(*speed["inference_vs_forward"])),
        ("one training step vs a bare forward+backward (smoke networks)", "", "",
         "{:.2f}x, {:.2f}x".format(*speed["train_step_vs_forward_backward"])),
        ("weighted box clustering of 10k boxes", f"{wbc:.3f} s", f"{nms:.2f} s MONAI `non_max_suppression`",
         f"{wbc / nms:.2f}x"),
    ]
    lines = ["| what | ours | baseline | ratio |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
