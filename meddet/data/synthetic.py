"""Seeded synthetic CT-like lesion detection datasets in nnDetection raw layout plus a MONAI datalist.

Each case is a chest-like phantom: air (-1000 HU) around an elliptic body of soft tissue (~40 HU), two
low-density lungs (~-800 HU), a bright spine, smooth tube-shaped vessels inside the lungs, spatially
correlated noise (Gaussian-filtered white noise), and 0..N ellipsoidal lesions (mostly in the lungs)
whose density is that of their surroundings (lung or soft tissue) plus a contrast, with a soft one-voxel edge.

The phantom is drawn on a grid with positive spacing along (x, y, z) = (left-right, front-back, slice);
the stored array is then flipped along at least one axis (and, for every ``permute_every``-th case,
its axes permuted) with the affine changed to match, so the world geometry is the same phantom but
voxel order and affine vary from file to file — the situation in which detection pipelines that
confuse voxel and world frames break. Affines also carry a random offset.

Boxes in the datalist are computed from the written instance masks: voxel ``[min, max + 1)`` converted
with the affine of the written file (`meddet.data.boxes.boxes_voxel_to_world`).

Every random draw of a case comes from ``numpy.random.default_rng((seed, case_index))``, so a case does
not depend on how many cases are generated.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from meddet.data.boxes import boxes_voxel_to_world, flip_lps_ras
from meddet.data.datalist import write_datalist
from meddet.data.nndet import boxes_from_instance_mask

__all__ = ["PRESETS", "synthesize_case", "generate_dataset", "generate_luna16_like"]

#: Dataset presets. Ranges are (low, high) drawn uniformly per case unless stated.
PRESETS: dict[str, dict] = {
    # Learnable by a tiny CPU detector in minutes: small volumes, fixed spacing, bright 8-24 mm lesions.
    "easy": {
        "num_training": 24,
        "num_validation": 12,
        "shape_min": (48, 48, 32),
        "shape_max": (64, 64, 40),
        "in_plane_spacing_mm": (1.5, 1.5),
        "slice_spacing_mm": (2.0, 2.0),
        "max_lesions": 3,
        "empty_fraction": 0.1,  # share of cases without lesions; the others have 1..max_lesions
        "lesion_diameter_mm": (8.0, 24.0),  # log-uniform
        "lesion_contrast_hu": (300.0, 500.0),
        "lesion_in_lung_fraction": 0.9,
        "lesion_max_tilt_deg": 20.0,
        "num_vessels": (3, 6),
        "vessel_radius_mm": (0.8, 1.5),
        "vessel_contrast_hu": (150.0, 300.0),
        "noise_hu": 20.0,
        "noise_correlation_mm": 1.0,
        "shading_hu": 0.0,  # amplitude of a smooth low-frequency intensity shading
        "permute_every": 4,
    },
    # Closer to chest CT: larger volumes, varied spacing, 3-30 mm lesions, dimmer and more varied
    # contrast, bright vessels as distractors, stronger noise and shading.
    "realistic": {
        "num_training": 60,
        "num_validation": 20,
        "shape_min": (112, 112, 80),
        "shape_max": (128, 128, 96),
        "in_plane_spacing_mm": (0.7, 1.5),
        "slice_spacing_mm": (1.25, 3.0),
        "max_lesions": 5,
        "empty_fraction": 0.1,
        "lesion_diameter_mm": (3.0, 30.0),
        "lesion_contrast_hu": (100.0, 450.0),
        "lesion_in_lung_fraction": 0.8,
        "lesion_max_tilt_deg": 30.0,
        "num_vessels": (12, 24),
        "vessel_radius_mm": (0.7, 3.0),
        "vessel_contrast_hu": (400.0, 850.0),
        "noise_hu": 45.0,
        "noise_correlation_mm": 1.2,
        "shading_hu": 40.0,
        "permute_every": 4,
    },
    # Labels are scarce here (the pre-training study): the easy preset's small volumes, but small dim lesions
    # among many bright vessels of similar density, in strong noise and shading, so that a detector trained on a
    # handful of volumes confuses vessels, noise and lesions.
    "scarce": {
        "num_training": 32,
        "num_validation": 24,
        "shape_min": (48, 48, 32),
        "shape_max": (64, 64, 40),
        "in_plane_spacing_mm": (1.5, 1.5),
        "slice_spacing_mm": (2.0, 2.0),
        "max_lesions": 3,
        "empty_fraction": 0.1,
        "lesion_diameter_mm": (6.0, 18.0),
        "lesion_contrast_hu": (250.0, 450.0),
        "lesion_in_lung_fraction": 0.9,
        "lesion_max_tilt_deg": 20.0,
        "num_vessels": (6, 12),
        "vessel_radius_mm": (0.8, 2.0),
        "vessel_contrast_hu": (150.0, 400.0),
        "noise_hu": 35.0,
        "noise_correlation_mm": 1.2,
        "shading_hu": 20.0,
        "permute_every": 4,
    },
}

AIR_HU, TISSUE_HU, LUNG_HU, BONE_HU = -1000.0, 40.0, -800.0, 500.0
_PARTIAL_VOLUME_SIGMA_VOXELS = 0.6
_MAX_PLACEMENT_TRIES = 50


def _coordinates(shape, spacing):
    """Open grid of voxel-centre coordinates in mm, broadcastable to `shape`."""
    return [np.arange(n, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)]) * s
            for axis, (n, s) in enumerate(zip(shape, spacing))]


def _soft_edge(signed_distance_mm, edge_mm):
    """1 inside, 0 outside, linear over one `edge_mm` wide band centred on the surface (0.5 on it)."""
    return np.clip(0.5 + signed_distance_mm / edge_mm, 0.0, 1.0)


def _draw_anatomy(rng, shape, spacing):
    """Background HU volume, lung mask and body mask (canonical orientation)."""
    x, y, z = _coordinates(shape, spacing)
    extent = np.asarray(shape) * np.asarray(spacing)
    centre = extent / 2 + rng.uniform(-0.03, 0.03, 3) * extent
    body_axes = extent[:2] * rng.uniform([0.43, 0.36], [0.48, 0.44])
    taper = 1.0 - 0.12 * ((z - centre[2]) / (extent[2] / 2)) ** 2
    body = ((x - centre[0]) / (body_axes[0] * taper)) ** 2 + ((y - centre[1]) / (body_axes[1] * taper)) ** 2 <= 1

    lungs = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        lung_centre = centre + np.array([side * 0.48 * body_axes[0], -0.05 * body_axes[1], 0.0])
        lung_axes = np.array([0.38 * body_axes[0], 0.72 * body_axes[1], 0.58 * extent[2]]) * rng.uniform(0.92, 1.05, 3)
        lungs |= sum(((c - m) / a) ** 2 for c, m, a in zip((x, y, z), lung_centre, lung_axes)) <= 1
    lungs &= body

    spine_centre = (centre[0], centre[1] + 0.78 * body_axes[1])
    spine_axes = (0.12 * body_axes[0], 0.13 * body_axes[1])
    spine = ((x - spine_centre[0]) / spine_axes[0]) ** 2 + ((y - spine_centre[1]) / spine_axes[1]) ** 2 <= 1
    spine = np.broadcast_to(spine & body, shape)

    volume = np.full(shape, AIR_HU, dtype=np.float32)
    volume[body] = TISSUE_HU
    volume[lungs] = LUNG_HU
    volume[spine] = BONE_HU
    volume = ndimage.gaussian_filter(volume, _PARTIAL_VOLUME_SIGMA_VOXELS)
    return volume, lungs, np.broadcast_to(body, shape)


def _segment_distance(points, start, end):
    """Distance (mm) of points (..., 3) to the segment start-end."""
    direction = end - start
    t = np.clip(((points - start) @ direction) / max(float(direction @ direction), 1e-9), 0.0, 1.0)
    return np.linalg.norm(points - start - t[..., None] * direction, axis=-1)


def _add_vessels(rng, volume, lungs, spacing, config):
    """Branch-like tubes grown from near the lung hila, contrast added inside the lungs only."""
    shape = np.asarray(volume.shape)
    spacing = np.asarray(spacing)
    lung_voxels = np.argwhere(lungs)
    if len(lung_voxels) == 0:
        return
    lung_lo, lung_hi = lung_voxels.min(0) * spacing, lung_voxels.max(0) * spacing
    lung_centre = lung_voxels.mean(0) * spacing
    profile = np.zeros(volume.shape, dtype=np.float32)
    for _ in range(rng.integers(config["num_vessels"][0], config["num_vessels"][1] + 1)):
        radius = rng.uniform(*config["vessel_radius_mm"])
        contrast = rng.uniform(*config["vessel_contrast_hu"])
        point = lung_centre + rng.normal(0, 0.15, 3) * (lung_hi - lung_lo)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        for _segment in range(3):
            length = rng.uniform(0.15, 0.35) * float(np.linalg.norm(lung_hi - lung_lo))
            end = point + direction * length
            reach = radius + 2 * spacing.max()
            lo = np.clip(np.floor((np.minimum(point, end) - reach) / spacing).astype(int), 0, shape)
            hi = np.clip(np.ceil((np.maximum(point, end) + reach) / spacing).astype(int) + 1, 0, shape)
            if np.all(hi > lo):
                grid = np.stack(np.meshgrid(*[np.arange(a, b) * s for a, b, s in zip(lo, hi, spacing)],
                                            indexing="ij"), axis=-1)
                tube = _soft_edge(radius - _segment_distance(grid, point, end), spacing.min()) * contrast
                block = tuple(slice(a, b) for a, b in zip(lo, hi))
                profile[block] = np.maximum(profile[block], tube)
            point, radius = end, max(0.5, radius * 0.75)
            direction = direction + rng.normal(0, 0.5, 3)
            direction /= np.linalg.norm(direction)
    volume += profile * lungs


def _random_rotation(rng, max_tilt_deg):
    angles = np.deg2rad(rng.uniform(-max_tilt_deg, max_tilt_deg, 3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = rotation @ r
    return rotation


def _add_lesions(rng, volume, lungs, body, spacing, config, num_lesions):
    """Place non-overlapping ellipsoids; returns the instance mask (uint8, 1..N) in canonical orientation."""
    shape = np.asarray(volume.shape)
    spacing = np.asarray(spacing)
    instances = np.zeros(volume.shape, dtype=np.uint8)
    lung_voxels, tissue_voxels = np.argwhere(lungs), np.argwhere(body & ~lungs)
    placed: list[tuple[np.ndarray, float]] = []
    log_lo, log_hi = np.log(config["lesion_diameter_mm"])
    for _ in range(_MAX_PLACEMENT_TRIES):
        if len(placed) == num_lesions:
            break
        semi_axes = np.exp(rng.uniform(log_lo, log_hi)) / 2 * rng.uniform(0.75, 1.25, 3)
        candidates = lung_voxels if rng.random() < config["lesion_in_lung_fraction"] else tissue_voxels
        if len(candidates) == 0:
            continue
        centre = (candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, 3)) * spacing
        reach = semi_axes.max() + spacing.max()
        lo = np.floor((centre - reach) / spacing).astype(int)
        hi = np.ceil((centre + reach) / spacing).astype(int) + 1
        if np.any(lo < 1) or np.any(hi > shape - 1):
            continue  # keep every lesion fully inside the volume
        if any(np.linalg.norm(centre - c) < semi_axes.max() + r + 2.0 for c, r in placed):
            continue
        rotation = _random_rotation(rng, config["lesion_max_tilt_deg"])
        grid = np.stack(np.meshgrid(*[np.arange(a, b) * s for a, b, s in zip(lo, hi, spacing)], indexing="ij"), -1)
        local = (grid - centre) @ rotation / semi_axes  # coordinates in the ellipsoid's own frame, unit sphere
        rho = np.linalg.norm(local, axis=-1)
        inside = rho <= 1.0
        if not inside.any():
            continue
        block = tuple(slice(a, b) for a, b in zip(lo, hi))
        # lesion density = surrounding tissue class + contrast; max() so that the part of a lung lesion
        # touching the chest wall merges with the wall instead of darkening it
        base = LUNG_HU if lungs[tuple((centre / spacing).astype(int))] else TISSUE_HU
        lesion_hu = base + rng.uniform(*config["lesion_contrast_hu"])
        # signed distance to the surface, approximated along the radius with the mean semi-axis
        weight = _soft_edge((1.0 - rho) * semi_axes.mean(), spacing.min())
        volume[block] = np.maximum(volume[block], volume[block] * (1 - weight) + lesion_hu * weight)
        placed.append((centre, float(semi_axes.max())))
        instances[block][inside] = len(placed)
    return instances


def _correlated_noise(rng, shape, spacing, config):
    sigma = [config["noise_correlation_mm"] / s for s in spacing]
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    noise *= config["noise_hu"] / max(float(noise.std()), 1e-6)
    if config["shading_hu"] > 0:
        # a few plane waves with wavelengths longer than the volume: smooth, cheap low-frequency shading
        coordinates = _coordinates(shape, spacing)
        extent = np.asarray(shape) * np.asarray(spacing)
        for _ in range(3):
            frequency = rng.uniform(-1.0, 1.0, 3) / extent
            phase = sum(2 * np.pi * f * c for f, c in zip(frequency, coordinates)) + rng.uniform(0, 2 * np.pi)
            noise += np.float32(config["shading_hu"] / 3) * np.cos(phase)
    return noise


def _reorient(rng, volume, instances, spacing, case_index, config):
    """Flip (>= 1 axis) and, for every `permute_every`-th case, permute the axes; returns arrays + affine."""
    shape = np.asarray(volume.shape)
    canonical = np.diag(list(spacing) + [1.0])
    canonical[:3, 3] = np.round(rng.uniform(-150, 150, 3), 2)

    flips = rng.random(3) < 0.5
    if not flips.any():
        flips[rng.integers(3)] = True
    flip = np.eye(4)
    for axis in np.flatnonzero(flips):
        volume, instances = np.flip(volume, axis), np.flip(instances, axis)
        flip[axis, axis], flip[axis, 3] = -1.0, shape[axis] - 1
    permutation = np.arange(3)
    every = config["permute_every"]
    if every and case_index % every == every - 1:
        while np.array_equal(permutation, np.arange(3)):
            permutation = rng.permutation(3)
    volume, instances = np.transpose(volume, permutation), np.transpose(instances, permutation)
    permute = np.eye(4)
    permute[:3, :3] = np.eye(3)[:, permutation]  # stored index m runs along flipped-array axis permutation[m]
    affine = canonical @ flip @ permute
    # the header stores float32; use exactly what readers will return
    return np.ascontiguousarray(volume), np.ascontiguousarray(instances), affine.astype(np.float32).astype(np.float64)


def synthesize_case(config: dict, rng: np.random.Generator, case_index: int = 0):
    """Draw one case.

    Args:
        config: a preset dict (see `PRESETS`).
        rng: random generator; the case is a deterministic function of its state and `case_index`.
        case_index: decides whether the axes are permuted (every `permute_every`-th case).

    Returns:
        image int16 (X, Y, Z) in HU, instance mask uint8 (X, Y, Z) with instances 1..N, the 4x4
        voxel-to-world affine of the stored arrays, and N.
    """
    shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(config["shape_min"], config["shape_max"]))
    in_plane = float(rng.uniform(*config["in_plane_spacing_mm"]))
    spacing = (in_plane, in_plane, float(rng.uniform(*config["slice_spacing_mm"])))
    if rng.random() < config["empty_fraction"]:
        num_lesions = 0
    else:
        num_lesions = int(rng.integers(1, config["max_lesions"] + 1))

    volume, lungs, body = _draw_anatomy(rng, shape, spacing)
    _add_vessels(rng, volume, lungs, spacing, config)
    instances = _add_lesions(rng, volume, lungs, body, spacing, config, num_lesions)
    volume += _correlated_noise(rng, shape, spacing, config)
    image = np.clip(np.round(volume), -1024, 3071).astype(np.int16)
    image, instances, affine = _reorient(rng, image, instances, spacing, case_index, config)
    return image, instances, affine, int(instances.max())


def _save_nifti(array, affine, path):
    image = nib.Nifti1Image(array, affine)
    # sform and qform both set so readers that prefer either (nibabel, ITK) agree on the geometry
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.set_data_dtype(array.dtype)
    nib.save(image, str(path))


def generate_dataset(output_dir, preset: str = "easy", num_training: int | None = None,
                     num_validation: int | None = None, seed: int = 0) -> str:
    """Write a synthetic detection dataset and return the path of its datalist.

    Args:
        output_dir: created if needed. Receives ``imagesTr/<case>_0000.nii.gz`` (int16 HU),
            ``labelsTr/<case>.nii.gz`` (uint8 instance mask), ``labelsTr/<case>.json``,
            ``dataset.json`` (nnDetection style) and ``datalist.json`` (MONAI detection).
        preset: a key of `PRESETS` ("easy", "realistic" or "scarce").
        num_training, num_validation: case counts (defaults from the preset). Cases
            ``case_0000 ..`` are training, the following ones validation.
        seed: dataset seed; case ``i`` is drawn from ``default_rng((seed, i))``.

    Returns:
        Path of ``datalist.json``: ``{"training": [...], "validation": [...]}``, items with ``image``,
        ``instance_mask`` (paths relative to output_dir), ``box`` (world ``cccwhd`` mm, from the written
        masks and affines) and ``label`` (all 0: one class, "lesion").
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[preset]
    num_training = config["num_training"] if num_training is None else int(num_training)
    num_validation = config["num_validation"] if num_validation is None else int(num_validation)
    output_dir = Path(output_dir)
    (output_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (output_dir / "labelsTr").mkdir(parents=True, exist_ok=True)

    items = []
    for case_index in range(num_training + num_validation):
        case = f"case_{case_index:04d}"
        rng = np.random.default_rng((int(seed), case_index))
        image, instances, affine, num_instances = synthesize_case(config, rng, case_index)
        _save_nifti(image, affine, output_dir / "imagesTr" / f"{case}_0000.nii.gz")
        _save_nifti(instances, affine, output_dir / "labelsTr" / f"{case}.nii.gz")
        with open(output_dir / "labelsTr" / f"{case}.json", "w", encoding="utf-8") as f:
            json.dump({"instances": {str(i): 0 for i in range(1, num_instances + 1)}}, f)
        voxel_boxes = boxes_from_instance_mask(instances)
        ids = sorted(voxel_boxes)
        world = boxes_voxel_to_world(np.stack([voxel_boxes[i] for i in ids]), affine) if ids else np.zeros((0, 6))
        items.append({
            "image": f"imagesTr/{case}_0000.nii.gz",
            "instance_mask": f"labelsTr/{case}.nii.gz",
            "box": [[round(float(v), 6) for v in box] for box in world],
            "label": [0] * len(ids),
        })

    description = {
        "task": f"Task000_Synthetic{preset.capitalize()}",
        "name": f"Synthetic{preset.capitalize()}",
        "description": f"meddet synthetic CT-like lesion detection, preset {preset!r}, seed {seed}",
        "dim": 3,
        "target_class": None,
        "test_labels": False,
        "labels": {"0": "lesion"},
        "modalities": {"0": "CT"},
        "modality": {"0": "CT"},
        "numTraining": num_training + num_validation,
    }
    with open(output_dir / "dataset.json", "w", encoding="utf-8") as f:
        json.dump(description, f, indent=2)
    return write_datalist({"training": items[:num_training], "validation": items[num_training:]},
                          output_dir / "datalist.json")


LUNA16_UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001."


def _save_metaimage(array, affine_ras, path) -> None:
    """`array` (X, Y, Z) with a RAS voxel-to-world affine -> MetaImage (.mhd + .raw) in ITK's LPS geometry."""
    import itk

    lps = np.array(affine_ras, dtype=np.float64)
    lps[:2] *= -1
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = itk.image_from_array(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(lps[:3, :3] / spacing)))
    itk.imwrite(image, str(path), compression=False)


def generate_luna16_like(output_dir, subsets: tuple[int, ...] = (0, 1, 2), scans_per_subset: int = 4,
                         seed: int = 0) -> dict:
    """A miniature dataset in the LUNA16 layout from the easy preset: ``subset<k>/<seriesuid>.mhd/.raw`` (LPS
    geometry, flipped and permuted axes, non-zero origins), ``annotations.csv`` (nodule centres in LPS mm,
    diameter = mean size of the lesion's box), ``annotations_excluded.csv`` (every third lesion, plus one
    finding of unknown diameter -1 per subset) and ``seriesuids.csv``. The first scan of every subset has no
    lesion (a negative scan).

    Returns:
        dict with ``luna_dir`` and ``nodules`` / ``excluded`` (seriesuid -> list of [x, y, z, diameter] LPS)
        and ``subset_of`` (seriesuid -> subset index).
    """
    output_dir = Path(output_dir)
    config = dict(PRESETS["easy"])
    nodules, excluded, subset_of = {}, {}, {}
    counter = 0
    for subset in subsets:
        folder = output_dir / f"subset{subset}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(scans_per_subset):
            rng = np.random.default_rng((int(seed), 1000 + counter))
            case_config = {**config, "empty_fraction": 1.0 if index == 0 else 0.0}
            image, instances, affine, _ = synthesize_case(case_config, rng, counter)
            uid = f"{LUNA16_UID_ROOT}{seed}{subset}{index:03d}{counter:05d}"
            _save_metaimage(image, affine, folder / f"{uid}.mhd")
            voxel_boxes = boxes_from_instance_mask(instances)
            rows = []
            for instance in sorted(voxel_boxes):
                world = boxes_voxel_to_world(voxel_boxes[instance][None], affine)[0]
                rows.append([*flip_lps_ras(world[:3], width=3)[0].tolist(), float(np.mean(world[3:]))])
            nodules[uid] = [row for i, row in enumerate(rows) if i % 3 != 2]
            excluded[uid] = [row for i, row in enumerate(rows) if i % 3 == 2]
            if index == 1:  # an excluded finding without a diameter, away from the lesions
                centre = boxes_voxel_to_world(np.array([[1.0, 1.0, 1.0, 3.0, 3.0, 3.0]]), affine)[0]
                excluded[uid].append([*flip_lps_ras(centre[:3], width=3)[0].tolist(), -1.0])
            subset_of[uid] = subset
            counter += 1

    def write(name, table):
        with open(output_dir / name, "w", encoding="utf-8") as f:
            f.write("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
            for uid, rows in table.items():
                f.writelines(f"{uid},{x!r},{y!r},{z!r},{d!r}\n" for x, y, z, d in rows)

    write("annotations.csv", nodules)
    write("annotations_excluded.csv", excluded)
    (output_dir / "seriesuids.csv").write_text("".join(f"{uid}\n" for uid in subset_of))
    return {"luna_dir": str(output_dir), "nodules": nodules, "excluded": excluded, "subset_of": subset_of}
