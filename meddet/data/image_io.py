"""Image headers of every format the bundles read: NIfTI through nibabel, MetaImage/NRRD/other files through ITK.

Geometry is returned as MONAI's readers see it: the 4x4 voxel-to-world affine in RAS (ITK's LPS geometry
converted as `ITKReader(affine_lps_to_ras=True)` does), so boxes written in that frame line up with the
loaded image whatever the file format.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["has_non_finite", "image_exists", "is_nifti", "read_header", "read_image_geometry"]


def image_exists(path) -> bool:
    """Whether `path` names something an image reader can open (a file)."""
    return Path(path).is_file()


def is_nifti(path) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _itk_header(path) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape in index order x, y, z[, components], RAS affine) of an ITK-readable file, header only."""
    import itk

    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise OSError(f"no reader (nibabel or ITK) for {path}")
    io.SetFileName(str(path))
    io.ReadImageInformation()
    ndim = io.GetNumberOfDimensions()
    shape = tuple(int(io.GetDimensions(i)) for i in range(ndim))
    if io.GetNumberOfComponents() > 1:
        shape = shape + (int(io.GetNumberOfComponents()),)
    rank = min(ndim, 3)
    affine = np.eye(4)
    for i in range(rank):
        # GetDirection(i) is the world direction of index axis i (a column of ITK's direction matrix)
        affine[:rank, i] = np.asarray(io.GetDirection(i))[:rank] * io.GetSpacing(i)
        affine[i, 3] = io.GetOrigin(i)
    affine[:2] *= -1  # LPS -> RAS, as MONAI's ITKReader(affine_lps_to_ras=True)
    return shape, affine


def read_header(path) -> tuple[tuple[int, ...], np.ndarray]:
    """Full array shape (spatial first, channels last as stored) and the 4x4 voxel-to-world affine."""
    if is_nifti(path):
        image = nib.load(str(path))
        return tuple(int(s) for s in image.shape), np.array(image.affine, dtype=np.float64)
    return _itk_header(path)


def read_image_geometry(path) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape (first three array axes) and 4x4 voxel-to-world affine of an image file.

    Reads the header only. NIfTI (``.nii``, ``.nii.gz``) through nibabel (``image.affine``, i.e. the
    sform or qform as nibabel picks, the affine MONAI's NibabelReader uses); other formats (mhd, nrrd,
    ...) through ITK with the LPS geometry converted to RAS as MONAI's ITKReader does.
    """
    shape, affine = read_header(path)
    return shape[:3], affine


def has_non_finite(path) -> bool:
    if is_nifti(path):
        image = nib.load(str(path))
        slope, inter = image.header.get_slope_inter()
        scaling_finite = all(v is None or math.isfinite(v) for v in (slope, inter))
        if image.header.get_data_dtype().kind in "iub" and scaling_finite:
            return False  # integer voxels with finite scaling cannot be NaN/Inf: skip reading the data
        data = np.asanyarray(image.dataobj)
    else:
        import itk

        data = itk.array_view_from_image(itk.imread(str(path)))
    return data.dtype.kind in "fc" and not bool(np.isfinite(data).all())
