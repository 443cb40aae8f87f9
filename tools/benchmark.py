"""Overhead benchmark: what the detection machinery costs on top of the network, measured in one run.

    python tools/benchmark.py [--size smoke|full] [--repeats 3]

Prints, on this machine and in this run, for the Retina U-Net and the Deformable DETR:
- whole-volume inference (sliding window + decoding + stitching + WBC) vs the pure network forward over the
  same tiles;
- one training step (anchors, ATSS matching, losses, backward, SGD step) vs a pure forward+backward of the
  network on the same patch batch;
- weighted box clustering of 1k and 10k boxes.
Ratios are what matter: absolute times depend on the machine and its load.
"""

from __future__ import annotations

import json
import statistics
import time

import fire
import torch

from meddet.detectors import DeformableDETRDetector, RetinaUNetDetector
from meddet.inference import SlidingWindowBoxInferer, tile_origins, weighted_box_clustering
from meddet.networks import deformable_detr_resenc, retina_unet_resenc

SMOKE_ENCODER = dict(features_per_stage=[8, 16, 32, 32], strides=[1, 2, 2, 2], blocks_per_stage=[1, 1, 1, 1])
SIZES = {
    # the smoke presets' networks and patch, on a volume like the easy synthetic set
    "smoke": dict(patch=(32, 32, 32), batch=4, volume=(64, 64, 48), networks={
        "retinaunet": dict(**SMOKE_ENCODER, detection_levels=[2, 3], fpn_channels=32, head_convs=1),
        "defdetr": dict(**SMOKE_ENCODER, feature_levels=[1, 2, 3], d_model=32, n_heads=4, dim_feedforward=128,
                        num_encoder_layers=2, num_decoder_layers=2, num_queries=12),
    }),
    # the paper's networks at a CPU-feasible patch (64^3 instead of 128^3)
    "full": dict(patch=(64, 64, 64), batch=1, volume=(128, 128, 96), networks={"retinaunet": {}, "defdetr": {}}),
}
ANCHORS = {"smoke": [[w, h, d] for w in (6, 8) for h in (6, 8) for d in (4, 6)],
           "full": [[w, h, d] for w in (4, 8, 14) for h in (4, 8, 14) for d in (2, 4, 6)]}


def build_detector(family: str, size: str, inferer):
    """(network, detector) of a family at the given size."""
    kwargs = SIZES[size]["networks"][family]
    if family == "retinaunet":
        network = retina_unet_resenc(num_anchors=len(ANCHORS[size]), **kwargs)
        return network, RetinaUNetDetector(network, anchor_shapes=ANCHORS[size], inferer=inferer)
    network = deformable_detr_resenc(**kwargs)
    return network, DeformableDETRDetector(network, inferer=inferer)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, lazy init)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


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


def _random_boxes(count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand((count // 8 + 1, 3), generator=generator) * 200
    centres = centres.repeat_interleave(8, 0)[:count] + torch.randn((count, 3), generator=generator)
    sizes = 5 + torch.rand((count, 3), generator=generator) * 10
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], 1)
    return boxes, torch.rand(count, generator=generator), torch.zeros(count, dtype=torch.long)


def _flat_outputs(outputs):
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    items = outputs.values() if isinstance(outputs, dict) else outputs
    return [t for item in items for t in _flat_outputs(item)]


def measure_family(family: str, size: str, repeats: int) -> dict:
    spec = SIZES[size]
    patch, batch = spec["patch"], spec["batch"]
    torch.manual_seed(0)
    network, detector = build_detector(family, size, SlidingWindowBoxInferer(roi_size=patch, overlap=0.5))
    results = {}

    # inference: whole volume vs pure network forward over the same tiles
    volume, _ = _blob_volume(spec["volume"], 6, seed=1)
    origins = tile_origins(spec["volume"], patch, 0.5)
    tiles = [volume[(0, slice(None), *[slice(o, o + p) for o, p in zip(origin, patch)])] for origin in origins]
    detector.eval()
    with torch.no_grad():
        whole = _time(lambda: detector(volume, use_inferer=True), repeats)
        forward = _time(lambda: [network(tile[None]) for tile in tiles], repeats)
    results.update(tiles=len(tiles), inference_s=whole, network_forward_s=forward, inference_overhead=whole / forward)

    # training: detector step (matching, losses, backward, optimizer) vs pure forward + backward
    patches, targets = _blob_volume(patch, 2, seed=2)
    patches = patches.repeat(batch, 1, 1, 1, 1)
    targets = targets * batch
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-4, momentum=0.9)
    detector.train()

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        detector(patches, targets)["loss"].backward()
        optimizer.step()

    def forward_backward():
        network.zero_grad(set_to_none=True)
        sum(o.float().mean() for o in _flat_outputs(network(patches))).backward()

    step = _time(train_step, repeats)
    pure = _time(forward_backward, repeats)
    results.update(train_step_s=step, forward_backward_s=pure, train_overhead=step / pure)
    return results


def benchmark(size: str = "smoke", repeats: int = 3, threads: int = 2) -> None:
    if size not in SIZES:
        raise SystemExit(f"size must be one of {sorted(SIZES)}")
    torch.set_num_threads(threads)
    spec = SIZES[size]
    results = {"size": size, "threads": threads, "patch": list(spec["patch"]), "batch": spec["batch"],
               "volume": list(spec["volume"])}
    for family in spec["networks"]:
        results.update({f"{family}_{key}": value for key, value in measure_family(family, size, repeats).items()})
    for count in (1000, 10000):
        boxes, scores, labels = _random_boxes(count)
        results[f"wbc_{count}_s"] = _time(lambda: weighted_box_clustering(boxes, scores, labels), repeats)

    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(json.dumps(results))


if __name__ == "__main__":
    fire.Fire(benchmark)
