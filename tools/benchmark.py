"""Overhead benchmark: what the detection machinery costs on top of the network, measured in one run.

    python tools/benchmark.py [--size smoke|full] [--repeats 3]

Prints, on this machine and in this run:
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

from meddet.detectors import RetinaUNetDetector
from meddet.inference import SlidingWindowBoxInferer, tile_origins, weighted_box_clustering
from meddet.networks import retina_unet_resenc

SIZES = {
    # the smoke preset's network and patch, on a volume like the easy synthetic set
    "smoke": dict(network=dict(features_per_stage=[8, 16, 32, 32], strides=[1, 2, 2, 2], blocks_per_stage=[1, 1, 1, 1],
                               detection_levels=[2, 3], fpn_channels=32, head_convs=1),
                  anchors=[[w, h, d] for w in (4, 6) for h in (4, 6) for d in (4, 6)],
                  patch=(32, 32, 32), batch=4, volume=(64, 64, 48)),
    # the paper's network at a CPU-feasible patch (64^3 instead of 128^3)
    "full": dict(network=dict(), anchors=[[w, h, d] for w in (4, 8, 14) for h in (4, 8, 14) for d in (2, 4, 6)],
                 patch=(64, 64, 64), batch=1, volume=(128, 128, 96)),
}


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


def benchmark(size: str = "smoke", repeats: int = 3, threads: int = 2) -> None:
    if size not in SIZES:
        raise SystemExit(f"size must be one of {sorted(SIZES)}")
    torch.set_num_threads(threads)
    spec = SIZES[size]
    torch.manual_seed(0)
    network = retina_unet_resenc(num_anchors=len(spec["anchors"]), **spec["network"])
    patch, batch = spec["patch"], spec["batch"]
    inferer = SlidingWindowBoxInferer(roi_size=patch, overlap=0.5, mirror_axes=())
    detector = RetinaUNetDetector(network, anchor_shapes=spec["anchors"], inferer=inferer)
    results = {"size": size, "threads": threads, "patch": list(patch), "batch": batch, "volume": list(spec["volume"])}

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
        outputs = network(patches)
        total = sum(o.float().mean() for key in ("classification", "box_regression") for o in outputs[key])
        (total + outputs["segmentation"].mean()).backward()

    step = _time(train_step, repeats)
    pure = _time(forward_backward, repeats)
    results.update(train_step_s=step, forward_backward_s=pure, train_overhead=step / pure)

    for count in (1000, 10000):
        boxes, scores, labels = _random_boxes(count)
        results[f"wbc_{count}_s"] = _time(lambda: weighted_box_clustering(boxes, scores, labels), repeats)

    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(json.dumps(results))


if __name__ == "__main__":
    fire.Fire(benchmark)
