"""World (mm, `cccwhd`) <-> voxel (`xyzxyz`) box conversion.

Conventions used across meddet:
- voxel boxes are MONAI's standard mode `xyzxyz` over array axes (i, j, k) of a channel-first image;
  voxel ``i`` covers ``[i, i + 1)``, so a lesion on voxels ``i0..i1`` has the box ``[i0, i1 + 1)``;
- an image affine maps the *centre* of voxel ``i`` to world, so box coordinate ``b`` sits at the
  continuous voxel index ``b - 0.5``. MONAI's `AffineBoxToWorldCoordinated` applies the affine to the
  box corners directly, which shifts every box by half a voxel; for centre-based criteria (LUNA16
  counts a hit within a radius of the annotated centre) that half voxel matters, hence our own pair;
- world boxes are `cccwhd` (centre, size) in the image's world frame; for an affine with rotations
  or axis permutations the size is that of the axis-aligned box around the 8 transformed corners
  (exact for flips and permutations, the standard choice for oblique grids).

Both functions accept numpy arrays or torch tensors of shape (N, 6) and return the same type.

Ignore regions (a datalist's ``ignore_box``) travel through the training transforms inside ``box`` with the
label `IGNORE_LABEL`, so every crop, flip, zoom and rotation moves them with the objects.
"""

from __future__ import annotations

import numpy as np
import torch

#: label of an ignore region among a training sample's boxes (no class has it)
IGNORE_LABEL = -1


def _to_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _like(result: np.ndarray, reference):
    if isinstance(reference, torch.Tensor):
        return torch.as_tensor(result, dtype=reference.dtype if reference.is_floating_point() else torch.float32,
                               device=reference.device)
    return result


def _affine(affine) -> np.ndarray:
    a = _to_numpy(affine).astype(np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine, got shape {a.shape}")
    return a


def boxes_world_to_voxel(boxes_cccwhd, affine):
    """World `cccwhd` boxes (N, 6) -> voxel `xyzxyz` boxes for an image with this voxel-to-world affine."""
    boxes = _to_numpy(boxes_cccwhd).astype(np.float64).reshape(-1, 6)
    inverse = np.linalg.inv(_affine(affine))
    centres = boxes[:, :3] @ inverse[:3, :3].T + inverse[:3, 3] + 0.5
    sizes = boxes[:, 3:] @ np.abs(inverse[:3, :3]).T
    return _like(np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1), boxes_cccwhd)


def boxes_voxel_to_world(boxes_xyzxyz, affine):
    """Voxel `xyzxyz` boxes (N, 6) -> world `cccwhd` boxes for an image with this voxel-to-world affine."""
    boxes = _to_numpy(boxes_xyzxyz).astype(np.float64).reshape(-1, 6)
    a = _affine(affine)
    centres = (boxes[:, :3] + boxes[:, 3:]) / 2 - 0.5
    sizes = boxes[:, 3:] - boxes[:, :3]
    world_centres = centres @ a[:3, :3].T + a[:3, 3]
    world_sizes = sizes @ np.abs(a[:3, :3]).T
    return _like(np.concatenate([world_centres, world_sizes], axis=1), boxes_xyzxyz)


def flip_lps_ras(values, width: int = 6) -> np.ndarray:
    """World points (N, 3) or `cccwhd` boxes (N, 6) between LPS and RAS: the two frames differ by the sign of the
    first two world axes (sizes are unchanged), so the map is its own inverse. Returns a float64 copy."""
    flipped = np.array(values, dtype=np.float64, copy=True).reshape(-1, width)
    flipped[:, :2] *= -1
    return flipped
