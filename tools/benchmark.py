"""Measuring instrument: what the collection costs beside a baseline, every pair measured in one run, interleaved.

    python tools/benchmark.py [--size smoke|full] [--sections overhead,wbc,loader,zoo] [--repeats 3]
                              [--threads 1] [--json PATH]

Each figure is the median of `repeats` rounds; within a round the compared variants run one after the other, so
machine load hits both alike. One torch thread by default: on a shared 2-core machine two threads swing 2-3x.
Sections:
- overhead: per family (Retina U-Net, Deformable DETR) at `size`, whole-volume inference (sliding window,
  decoding, stitching, WBC) beside the bare network forward over the same tiles, and one training step beside a
  bare forward+backward on the same batch.
- wbc: weighted box clustering beside MONAI's `non_max_suppression` on 1k and 10k boxes.
- loader: the training chain's random part (box-aware crop and every augmentation) on a cached, preprocessed
  chest-CT-sized volume (450x450x190, 38 M voxels) at the bundles' 128^3 patch, beside the same chain with MONAI's
  `RandCropBoxByPosNegLabeld` (the crop the bundles used before), in patches/s for one worker; also from the
  volume memory-mapped as `cache_dir` serves it (page cache warm).
- zoo: per volume, the `retinaunet_resencl_scratch_detection` bundle's detector (its own inference config,
  full-size network, mirror TTA off) beside the MONAI model zoo's `lung_nodule_ct_detection` RetinaNet built from
  MONAI parts with the zoo's published settings (ResNet-50 with first stride (2, 2, 1), FPN on layers 1-2, 3 anchor
  shapes, score 0.02, top 1000 per level, NMS 0.22, 300 detections). The zoo's 512x512x192 window holds the test
  volume whole, so it runs as one pass without padding to that window (the cheapest the zoo can do).
  Both with random weights: the network cost does not depend on them.
`--json PATH` writes every figure; scripts read `loader_patches_per_s_per_worker` and `inference_vs_zoo_ratio`.
Ratios carry over between machines; absolute times depend on the machine and its load.
"""

from __future__ import annotations

import json as json_module
import os
import platform
import statistics
import sys
import time

import fire
import numpy as np
import torch

from meddet.detectors import DeformableDETRDetector, RetinaUNetDetector
from meddet.inference import SlidingWindowBoxInferer, tile_origins, weighted_box_clustering
from meddet.networks import deformable_detr_resenc, retina_unet_resenc

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("overhead", "wbc", "loader", "zoo")
SMOKE_ENCODER = dict(features_per_stage=[8, 16, 32, 32], strides=[1, 2, 2, 2], blocks_per_stage=[1, 1, 1, 1])
SIZES = {
    # the smoke presets' networks and patch, on a volume like the easy synthetic set
    "smoke": dict(patch=(32, 32, 32), batch=4, volume=(64, 64, 48), zoo_volume=(128, 128, 64), networks={
        "retinaunet": dict(**SMOKE_ENCODER, detection_levels=[2, 3], fpn_channels=32, head_convs=1),
        "defdetr": dict(**SMOKE_ENCODER, detection_levels=[1, 2, 3], d_model=32, num_heads=4, dim_feedforward=128,
                        num_encoder_layers=2, num_decoder_layers=2, num_queries=12),
    }),
    # the paper's networks at a CPU-feasible patch (64^3 instead of 128^3)
    "full": dict(patch=(64, 64, 64), batch=1, volume=(128, 128, 96), zoo_volume=(192, 192, 96),
                 networks={"retinaunet": {}, "defdetr": {}}),
}
ANCHORS = {"smoke": [[w, h, d] for w in (6, 8) for h in (6, 8) for d in (4, 6)],
           "full": [[w, h, d] for w in (4, 8, 14) for h in (4, 8, 14) for d in (2, 4, 6)]}
LOADER_VOLUME = (450, 450, 190)
LOADER_PATCH = (128, 128, 128)
ZOO_BUNDLE = "retinaunet_resencl_scratch_detection"


def interleaved(variants: dict, repeats: int, warmup: bool = True) -> dict:
    """Median seconds per variant over `repeats` rounds; each round runs every variant once, in turn."""
    if warmup:
        for run in variants.values():
            run()
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


# ------------------------------------------------------------------ overhead: detector vs bare network
def build_detector(family: str, size: str, inferer):
    """(network, detector) of a family at the given size."""
    kwargs = SIZES[size]["networks"][family]
    if family == "retinaunet":
        network = retina_unet_resenc(num_anchors=len(ANCHORS[size]), **kwargs)
        return network, RetinaUNetDetector(network, anchor_shapes=ANCHORS[size], inferer=inferer)
    network = deformable_detr_resenc(**kwargs)
    return network, DeformableDETRDetector(network, inferer=inferer)


def _blob_volume(shape, num_blobs: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    volume = torch.randn((1, 1, *shape), generator=generator) * 0.3
    boxes = []
    for _ in range(num_blobs):
        size = torch.randint(4, 10, (3,), generator=generator)
        start = [int(torch.randint(0, s - int(z), (1,), generator=generator)) for s, z in zip(shape, size)]
        stop = [a + int(z) for a, z in zip(start, size)]
        volume[0, 0, start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] += 2.0
        boxes.append(start + stop)
    return volume, [{"box": torch.tensor(boxes, dtype=torch.float32), "label": torch.zeros(len(boxes), dtype=torch.long)}]


def _flat_outputs(outputs):
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    items = outputs.values() if isinstance(outputs, dict) else outputs
    return [t for item in items for t in _flat_outputs(item)]


def measure_overhead(family: str, size: str, repeats: int) -> dict:
    spec = SIZES[size]
    patch, batch = spec["patch"], spec["batch"]
    torch.manual_seed(0)
    network, detector = build_detector(family, size, SlidingWindowBoxInferer(roi_size=patch, overlap=0.5))
    volume, _ = _blob_volume(spec["volume"], 6, seed=1)
    origins = tile_origins(spec["volume"], patch, 0.5)
    tiles = torch.stack([volume[(0, slice(None), *[slice(o, o + p) for o, p in zip(origin, patch)])]
                         for origin in origins])
    detector.eval()
    with torch.no_grad():
        times = interleaved({"inference": lambda: detector(volume, use_inferer=True),
                             "forward": lambda: [network(tile[None]) for tile in tiles]}, repeats)
    results = {"tiles": len(tiles), "inference_s": times["inference"], "network_forward_s": times["forward"],
               "inference_overhead": times["inference"] / times["forward"]}

    patches, targets = _blob_volume(patch, 2, seed=2)
    patches, targets = patches.repeat(batch, 1, 1, 1, 1), targets * batch
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-4, momentum=0.9)
    detector.train()

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        detector(patches, targets)["loss"].backward()
        optimizer.step()

    def forward_backward():
        network.zero_grad(set_to_none=True)
        sum(o.float().mean() for o in _flat_outputs(network(patches))).backward()

    times = interleaved({"step": train_step, "bare": forward_backward}, repeats)
    results.update(train_step_s=times["step"], forward_backward_s=times["bare"],
                   train_overhead=times["step"] / times["bare"])
    return results


# ------------------------------------------------------------------ wbc vs MONAI's NMS
def _random_boxes(count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand((count // 8 + 1, 3), generator=generator) * 200
    centres = centres.repeat_interleave(8, 0)[:count] + torch.randn((count, 3), generator=generator)
    sizes = 5 + torch.rand((count, 3), generator=generator) * 10
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], 1)
    return boxes, torch.rand(count, generator=generator), torch.zeros(count, dtype=torch.long)


def measure_wbc(repeats: int) -> dict:
    from monai.data.box_utils import non_max_suppression

    results = {}
    for count in (1000, 10000):
        boxes, scores, labels = _random_boxes(count)
        times = interleaved({"wbc": lambda: weighted_box_clustering(boxes, scores, labels, iou_thresh=0.1),
                             "nms": lambda: non_max_suppression(boxes, scores, 0.1)}, repeats)
        results.update({f"wbc_{count}_s": times["wbc"], f"monai_nms_{count}_s": times["nms"],
                        f"wbc_vs_nms_{count}_ratio": times["wbc"] / times["nms"]})
    return results


# ------------------------------------------------------------------ loader: patches/s per worker
def chest_ct_sample(shape=LOADER_VOLUME, num_nodules: int = 5, seed: int = 0) -> dict:
    """A cached, preprocessed sample as the training chain's random part receives it: a normalised float32
    MetaTensor of a chest-CT-sized grid and voxel boxes of nodule size."""
    from monai.data import MetaTensor

    rng = np.random.default_rng(seed)
    image = rng.standard_normal((1, *shape), dtype=np.float32)
    low, high = np.array(shape) * 0.15, np.array(shape) * 0.85
    centres = rng.uniform(low, high, size=(num_nodules, 3))
    sizes = rng.uniform(4, 24, size=(num_nodules, 3))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    return {"image": MetaTensor(torch.from_numpy(image), affine=torch.eye(4)),
            "box": torch.as_tensor(boxes, dtype=torch.float32),
            "label": torch.zeros(num_nodules, dtype=torch.long)}


def loader_chains(patch=LOADER_PATCH):
    """(bundles' chain, the same chain with MONAI's RandCropBoxByPosNegLabeld): their random parts only, as a
    loader worker runs them on a cached sample."""
    from monai.apps.detection.transforms.dictionary import RandCropBoxByPosNegLabeld
    from monai.transforms import Compose, Randomizable

    from meddet.data.transforms import RandCropTargetBoxByPosNegLabeld, training_transforms

    chain = training_transforms(patch, (0.8, 0.8, 2.0), (-1000.0, 500.0), -450.0, 420.0).transforms
    first = next(index for index, transform in enumerate(chain) if isinstance(transform, Randomizable))
    ours = list(chain[first:])
    crop = ours[0]
    if not isinstance(crop, RandCropTargetBoxByPosNegLabeld):
        raise RuntimeError(f"benchmark: the chain's first random transform is {type(crop).__name__}, not the crop")
    monai_crop = RandCropBoxByPosNegLabeld(image_keys="image", box_keys="box", label_keys="label",
                                           spatial_size=patch, whole_box=True, pos=crop.pos_ratio,
                                           neg=1 - crop.pos_ratio)
    baseline = [monai_crop] + [transform for transform in ours[1:]]
    ours, baseline = Compose(ours), Compose(baseline)
    ours.set_random_state(0)
    baseline.set_random_state(0)
    return ours, baseline


def measure_loader(repeats: int, volume=LOADER_VOLUME, patch=LOADER_PATCH) -> dict:
    import tempfile
    import warnings

    sample = chest_ct_sample(tuple(volume))
    ours, baseline = loader_chains(tuple(patch))
    disk_chain, _ = loader_chains(tuple(patch))
    per_round = {"ours": 8, "disk": 8, "baseline": 2}
    with tempfile.TemporaryDirectory() as folder:
        # what meddet.data.cache.MappedPersistentDataset serves on a cache hit (the page cache is warm here)
        torch.save(sample, os.path.join(folder, "volume.pt"))
        mapped = torch.load(os.path.join(folder, "volume.pt"), mmap=True, weights_only=False)

        def draw(chain, source, count):
            def run():
                for _ in range(count):
                    chain(source)
            return run

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = interleaved({"ours": draw(ours, sample, per_round["ours"]),
                                 "disk": draw(disk_chain, mapped, per_round["disk"]),
                                 "baseline": draw(baseline, sample, per_round["baseline"])}, repeats)
    rates = {name: per_round[name] / times[name] for name in per_round}
    return {"loader_volume": list(volume), "loader_patch": list(patch),
            "loader_patches_per_s_per_worker": rates["ours"],
            "loader_disk_cache_patches_per_s_per_worker": rates["disk"],
            "loader_monai_crop_patches_per_s_per_worker": rates["baseline"],
            "loader_speedup": rates["ours"] / rates["baseline"]}


# ------------------------------------------------------------------ zoo: per-volume inference
def zoo_retinanet_detector():
    """The model zoo's lung_nodule_ct_detection RetinaNet (network and detector) from MONAI parts."""
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.nets import resnet50

    backbone = resnet50(spatial_dims=3, n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7])
    network = RetinaNet(spatial_dims=3, num_classes=1, num_anchors=3, size_divisible=[16, 16, 8],
                        feature_extractor=resnet_fpn_feature_extractor(backbone, 3, False, [1, 2], None))
    anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=[1, 2, 4],
                                             base_anchor_shapes=[[6, 8, 4], [8, 6, 5], [10, 10, 6]])
    detector = RetinaNetDetector(network, anchors, debug=False)
    detector.set_box_selector_parameters(score_thresh=0.02, topk_candidates_per_level=1000, nms_thresh=0.22,
                                         detections_per_img=300)
    return detector.eval()


def bundle_detector(bundle: str = ZOO_BUNDLE, mirror_axes=()):
    """A bundle's detector as its inference config builds it (full size), with the given TTA mirror axes."""
    from monai.bundle import ConfigParser

    root = os.path.join(REPO_ROOT, "bundles", bundle)
    parser = ConfigParser()
    parser.read_config(os.path.join(root, "configs", "inference.json"))
    parser.update({"bundle_root": root, "device": "$torch.device('cpu')", "tta_mirror_axes": list(mirror_axes)})
    return parser.get_parsed_content("detector", lazy=False).eval()


def measure_zoo(repeats: int, volume, bf16: bool = False) -> dict:
    torch.manual_seed(0)
    ours, zoo = bundle_detector(), zoo_retinanet_detector()
    image, _ = _blob_volume(tuple(volume), 6, seed=3)
    image = image[0]
    variants = {"ours": lambda: ours([image], use_inferer=True), "zoo": lambda: zoo([image], use_inferer=False)}
    if bf16:
        def autocast(run):
            def wrapped():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return run()
            return wrapped
        variants.update({"ours_bf16": autocast(variants["ours"]), "zoo_bf16": autocast(variants["zoo"])})
    with torch.no_grad():
        times = interleaved(variants, repeats, warmup=False)
    results = {"zoo_volume": list(volume), "zoo_tiles": len(tile_origins(volume, ours.inferer.tile_size(volume),
                                                                          ours.inferer.overlap)),
               "zoo_tile_size": list(ours.inferer.tile_size(volume)),
               "ours_inference_s": times["ours"], "zoo_retinanet_inference_s": times["zoo"],
               "inference_vs_zoo_ratio": times["ours"] / times["zoo"]}
    if bf16:
        results.update(ours_inference_bf16_s=times["ours_bf16"], zoo_retinanet_inference_bf16_s=times["zoo_bf16"],
                       inference_vs_zoo_ratio_bf16=times["ours_bf16"] / times["zoo_bf16"])
    return results


def machine_name() -> str:
    """CPU model and core count (what a figure was measured on)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def run_benchmark(size: str = "smoke", sections: str | tuple = SECTIONS, repeats: int = 3, threads: int = 1,
                  json: str | None = None, loader_volume=LOADER_VOLUME, loader_patch=LOADER_PATCH, zoo_volume=None,
                  bf16: bool = False) -> dict:
    """Run the chosen sections (comma-separated or a list), print every figure, return them; `json`: also write
    them to that file. `bf16`: the zoo section also runs both detectors under CPU bfloat16 autocast."""
    if size not in SIZES:
        raise SystemExit(f"size must be one of {sorted(SIZES)}")
    chosen = [s.strip() for s in sections.split(",")] if isinstance(sections, str) else list(sections)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    torch.set_num_threads(threads)
    spec = SIZES[size]
    results = {"machine": machine_name(),
               "size": size, "threads": threads, "repeats": repeats}
    if "overhead" in chosen:
        results.update(patch=list(spec["patch"]), batch=spec["batch"], volume=list(spec["volume"]))
        for family in spec["networks"]:
            results.update({f"{family}_{key}": value for key, value in measure_overhead(family, size, repeats).items()})
    if "wbc" in chosen:
        results.update(measure_wbc(repeats))
    if "loader" in chosen:
        results.update(measure_loader(repeats, tuple(loader_volume), tuple(loader_patch)))
    if "zoo" in chosen:
        results.update(measure_zoo(repeats, tuple(zoo_volume or spec["zoo_volume"]), bf16))

    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if json:
        with open(json, "w", encoding="utf-8") as handle:
            json_module.dump(results, handle, indent=2)
        print(f"figures written to {json}", file=sys.stderr)
    return results


if __name__ == "__main__":
    fire.Fire(run_benchmark, serialize=lambda figures: None)  # printed already, one figure per line
