"""Image headers of every format the bundles read: NIfTI through nibabel; MetaImage, NRRD, DICOM series folders and
other files through ITK.

Geometry is returned as MONAI's readers see it: the 4x4 voxel-to-world affine in RAS (ITK's LPS geometry
converted as `ITKReader(affine_lps_to_ras=True)` does), so boxes written in that frame line up with the
loaded image whatever the file format. A folder is read as one DICOM series, as MONAI's `ITKReader` reads it;
`read_header` first checks that the folder holds exactly one complete, evenly spaced series and raises
`ImageFormatError` saying what is wrong otherwise (ITK would load such a folder silently, distorted).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["ImageFormatError", "has_non_finite", "image_exists", "image_stem", "is_nifti", "metaimage_data_problem", "nifti_data_problem", "read_header",
           "read_image_geometry"]

_POSITION, _ORIENTATION, _SERIES_UID = "0020|0032", "0020|0037", "0020|000e"
# slice gaps may differ by this much (relative to the median gap, or absolute mm) before a series is uneven
_GAP_RTOL, _GAP_ATOL_MM = 0.01, 0.01
_MAX_LISTED = 5


class ImageFormatError(ValueError):
    """An image path that exists but is not one readable 3D volume; the message names the path and the fix."""


def image_exists(path) -> bool:
    """Whether `path` names a file or a folder (read as a DICOM series; `read_header` validates the folder)."""
    # a folder without a usable series must reach read_header, whose error says why, not "not found"
    return Path(path).is_file() or Path(path).is_dir()


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd", ".nhdr")


def image_stem(path) -> str:
    """A case name from an image path: the file name without its image suffix (LUNA16's seriesuids keep their
    dots), or a DICOM series folder's name."""
    name = Path(str(path).rstrip("/\\")).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _ras_affine(direction: np.ndarray, spacing, origin) -> np.ndarray:
    """4x4 RAS affine from ITK's LPS geometry (direction columns = index axes), as MONAI's ITKReader builds it."""
    rank = min(len(spacing), 3)
    affine = np.eye(4)
    affine[:rank, :rank] = np.asarray(direction)[:rank, :rank] * np.asarray(spacing)[:rank]
    affine[:rank, 3] = np.asarray(origin)[:rank]
    affine[:2] *= -1  # LPS -> RAS, as ITKReader(affine_lps_to_ras=True)
    return affine


def _itk_image_io(path):
    """ITK's reader of `path` with the header read (no voxel data)."""
    import itk

    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise OSError(f"no reader (nibabel or ITK) for {path}")
    io.SetFileName(str(path))
    io.ReadImageInformation()
    return io


def _itk_header(path) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape in index order x, y, z[, components], RAS affine) of an ITK-readable file, header only."""
    io = _itk_image_io(path)
    ndim = io.GetNumberOfDimensions()
    shape = tuple(int(io.GetDimensions(i)) for i in range(ndim))
    if io.GetNumberOfComponents() > 1:
        shape = shape + (int(io.GetNumberOfComponents()),)
    # GetDirection(i) is the world direction of index axis i, i.e. a column of ITK's direction matrix
    direction = np.stack([np.asarray(io.GetDirection(i))[:ndim] for i in range(ndim)], axis=1)
    spacing = [io.GetSpacing(i) for i in range(ndim)]
    return shape, _ras_affine(direction, spacing, [io.GetOrigin(i) for i in range(ndim)])


@contextmanager
def _quiet_itk():
    """ITK prints warnings such as "No Series were found" to stderr; the ImageFormatError raised says it better."""
    import itk

    shown = itk.Object.GetGlobalWarningDisplay()
    itk.Object.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        itk.Object.SetGlobalWarningDisplay(shown)


def _dicom_tags(file: str) -> dict[str, str]:
    """Position, orientation and series UID of one DICOM file (header only, through ITK's GDCMImageIO)."""
    import itk

    io = itk.GDCMImageIO.New()
    io.SetFileName(str(file))
    io.ReadImageInformation()
    meta = io.GetMetaDataDictionary()
    return {key: str(meta[key]).strip() for key in (_POSITION, _ORIENTATION, _SERIES_UID) if meta.HasKey(key)}


def _describe_series(series: list[list[str]]) -> str:
    uids = [_dicom_tags(files[0]).get(_SERIES_UID, "(no SeriesInstanceUID)") for files in series]
    listing = "; ".join(f"{uid} ({len(files)} slice{'s' if len(files) != 1 else ''})"
                        for uid, files in zip(uids, series))
    if len(set(uids)) < len(uids):  # GDCM also splits a series by number, thickness or size, as MONAI's reader does
        listing += " (series sharing a SeriesInstanceUID differ in series number, slice thickness or image size)"
    return listing


def _series_files(folder) -> list[str]:
    """Files of the single DICOM series in `folder`, grouped and sorted exactly as MONAI's ITKReader does."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)  # same grouping as ITKReader / itk.imread, so the same files are read
    names.AddSeriesRestriction("0008|0021")
    with _quiet_itk():
        names.SetDirectory(str(folder))
        series = [list(names.GetFileNames(uid)) for uid in names.GetSeriesUIDs()]
    if not series:
        raise ImageFormatError(f"DICOM series folder {folder}: no DICOM files found (an image path that is a "
                               "folder must hold the DICOM files of one series)")
    if len(series) > 1:
        raise ImageFormatError(f"DICOM series folder {folder} holds {len(series)} series: {_describe_series(series)}"
                               "; MONAI would silently read only one: move each series into its own folder and "
                               "list one folder per image")
    if len(series[0]) < 2:
        raise ImageFormatError(f"DICOM series folder {folder}: the series has {len(series[0])} slice file; a 3D "
                               "volume needs at least 2 (multi-frame DICOM files are not supported)")
    return series[0]


def _numbers(text: str, count: int, key: str, file: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in text.split("\\")])
    except ValueError:
        values = np.zeros(0)
    if values.shape != (count,) or not np.isfinite(values).all():
        raise ImageFormatError(f"DICOM file {file}: tag ({key.replace('|', ',')}) is {text!r}, "
                               f"expected {count} numbers")
    return values


def _slice_positions(folder, files: list[str]) -> np.ndarray:
    """Each file's ImagePositionPatient projected on the slice normal (mm), in file order."""
    tags = [_dicom_tags(f) for f in files]
    lacking = [Path(f).name for f, t in zip(files, tags) if _POSITION not in t or _ORIENTATION not in t]
    if lacking:
        raise ImageFormatError(f"DICOM series folder {folder}: {len(lacking)} file(s) lack ImagePositionPatient "
                               f"(0020,0032) or ImageOrientationPatient (0020,0037), e.g. {lacking[:_MAX_LISTED]}; "
                               "the slices cannot be placed in space")
    orientations = np.stack([_numbers(t[_ORIENTATION], 6, _ORIENTATION, f) for f, t in zip(files, tags)])
    tilted = np.abs(orientations - orientations[0]).max(axis=1) > 1e-4
    if tilted.any():
        raise ImageFormatError(f"DICOM series folder {folder}: slices have different ImageOrientationPatient "
                               f"(e.g. {Path(files[0]).name} and {Path(files[int(np.argmax(tilted))]).name}); "
                               "one volume needs parallel slices")
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    return np.stack([_numbers(t[_POSITION], 3, _POSITION, f) for f, t in zip(files, tags)]) @ normal


def _spacing_problems(files: list[str], positions: np.ndarray) -> list[str]:
    """Missing slices (a gap that is a multiple of the usual one) and otherwise unequal gaps, as sentences."""
    order = np.argsort(positions, kind="stable")
    files, positions = [Path(files[i]).name for i in order], positions[order]
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    tolerance = max(_GAP_RTOL * step, _GAP_ATOL_MM)
    if step <= tolerance:
        return [f"most slices share their position (median gap {step:.4g} mm): several acquisitions in one folder?"]
    multiples = np.round(gaps / step)
    missing = (multiples >= 2) & (np.abs(gaps - multiples * step) <= multiples * tolerance)
    uneven = ~missing & (np.abs(gaps - step) > tolerance)
    problems = []
    if missing.any():
        where = [f"{int(multiples[i]) - 1} between {files[i]} ({positions[i]:.2f} mm along the slice normal) and "
                 f"{files[i + 1]} ({positions[i + 1]:.2f} mm)" for i in np.flatnonzero(missing)[:_MAX_LISTED]]
        problems.append(f"{int((multiples[missing] - 1).sum())} slice(s) missing (usual spacing {step:.4g} mm): "
                        + "; ".join(where))
    if uneven.any():
        where = [f"{gaps[i]:.4g} mm between {files[i]} and {files[i + 1]}"
                 for i in np.flatnonzero(uneven)[:_MAX_LISTED]]
        problems.append(f"unequal slice spacing (usual {step:.4g} mm, tolerance {tolerance:.2g} mm): "
                        + "; ".join(where))
    return problems


def _checked_series(folder) -> list[str]:
    """The files of the folder's one series, after checking it forms an evenly sampled volume."""
    files = _series_files(folder)
    problems = _spacing_problems(files, _slice_positions(folder, files))
    if problems:
        raise ImageFormatError(f"DICOM series folder {folder}: " + "; ".join(problems)
                               + " (ITK would stack the slices evenly and misplace every box)")
    return files


def _dicom_header(folder) -> tuple[tuple[int, ...], np.ndarray]:
    import itk

    # the reader itk.imread builds for ITKReader; its output information (no pixel data) is the loaded geometry
    reader = itk.ImageSeriesReader.New(FileNames=_checked_series(folder))
    reader.UpdateOutputInformation()
    image = reader.GetOutput()
    shape = tuple(int(s) for s in image.GetLargestPossibleRegion().GetSize())
    if image.GetNumberOfComponentsPerPixel() > 1:
        shape = shape + (int(image.GetNumberOfComponentsPerPixel()),)
    direction = itk.array_from_matrix(image.GetDirection())
    return shape, _ras_affine(direction, list(image.GetSpacing()), list(image.GetOrigin()))


_ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                  "MET_LONG": 8, "MET_ULONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
_ITK_INTEGER_TYPES = {"char", "unsigned_char", "short", "unsigned_short", "int", "unsigned_int", "long",
                      "unsigned_long", "long_long", "unsigned_long_long"}


def metaimage_data_problem(path) -> str | None:
    """Why a MetaImage header (.mhd) cannot be read with its data: a missing data file, or one whose size is not
    what the header's DimSize and ElementType need (None when it can). ITK would fail later, mid-training,
    with a message that does not say which."""
    path = Path(path)
    fields = {}
    try:
        for line in path.read_text(errors="replace").splitlines():
            if "=" in line:
                key, value = line.split("=", 1)
                fields[key.strip()] = value.strip()
    except OSError as error:
        return f"cannot be read ({error})"
    for key in ("DimSize", "ElementType", "ElementDataFile"):
        if key not in fields:
            return f"MetaImage header has no {key}"
    data_file = fields["ElementDataFile"]
    if data_file == "LOCAL":
        return None
    raw = path.parent / data_file
    if not raw.is_file():
        return f"its data file {raw} (ElementDataFile) does not exist"
    if fields.get("CompressedData", "False").lower() == "true":
        return None
    try:
        size = [int(v) for v in fields["DimSize"].split()]
    except ValueError:
        return f"DimSize = {fields['DimSize']!r} is not a list of integers"
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    element = _ELEMENT_BYTES.get(fields["ElementType"])
    if element is None:
        return None  # a type ITK knows but this check does not: ITK will judge it
    expected = int(np.prod(size)) * channels * element
    actual = raw.stat().st_size
    if actual != expected:
        return (f"header DimSize {size} x {fields['ElementType']} needs {expected} bytes but {raw.name} has "
                f"{actual}")
    return None



def nifti_data_problem(path, image=None) -> str | None:
    """Why a NIfTI file's voxel data cannot be read in full (None when it can), without decompressing it: an
    uncompressed file shorter than its header's data needs, or a gzip stream whose trailer does not record the
    size the header needs (the last 4 bytes of a gzip file hold the uncompressed size modulo 2**32; a file cut
    short ends in arbitrary bytes instead). Only on that mismatch is the stream decompressed, to tell a cut file
    from a valid multi-part gzip file."""
    import gzip

    image = image if image is not None else nib.load(str(path))
    header = image.header
    needed = int(header.get("vox_offset", 0)) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if not str(path).lower().endswith(".gz"):
        size = os.path.getsize(path)
        return None if size >= needed else f"the file has {size} bytes but its header needs {needed}: cut short?"
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        recorded = int.from_bytes(f.read(4), "little")
    if recorded == needed % 2 ** 32:
        return None
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (OSError, EOFError) as error:
        return f"the compressed data is cut short or damaged ({type(error).__name__}: {error})"
    return None


def read_header(path) -> tuple[tuple[int, ...], np.ndarray]:
    """Full array shape (spatial first, channels last as stored) and the 4x4 voxel-to-world affine (RAS).

    Raises `ImageFormatError` for a folder that is not one complete, evenly spaced DICOM series.
    """
    if Path(path).is_dir():
        return _dicom_header(path)
    if is_nifti(path):
        image = nib.load(str(path))
        problem = nifti_data_problem(path, image)
        if problem:
            raise ImageFormatError(f"{path}: {problem}")
        return tuple(int(s) for s in image.shape), np.array(image.affine, dtype=np.float64)
    if str(path).lower().endswith(".mhd"):
        problem = metaimage_data_problem(path)
        if problem:
            raise ImageFormatError(f"{path}: {problem}")
    return _itk_header(path)


def read_image_geometry(path) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape (first three array axes) and 4x4 voxel-to-world affine of an image file or DICOM folder.

    Reads the header only. NIfTI (``.nii``, ``.nii.gz``) through nibabel (``image.affine``, i.e. the
    sform or qform as nibabel picks, the affine MONAI's NibabelReader uses); other formats (mhd, nrrd,
    DICOM series folders, ...) through ITK with the LPS geometry converted to RAS as MONAI's ITKReader does.
    """
    shape, affine = read_header(path)
    return shape[:3], affine


def _dicom_has_non_finite(folder) -> bool:
    import itk

    files = _series_files(folder)
    io = itk.GDCMImageIO.New()
    io.SetFileName(files[0])
    io.ReadImageInformation()
    stored = itk.ImageIOBase.GetComponentTypeAsString(io.GetInternalComponentType())
    if stored not in ("float", "double") and all(map(math.isfinite, (io.GetRescaleSlope(), io.GetRescaleIntercept()))):
        return False  # integer pixel data with finite rescaling cannot be NaN/Inf: skip reading the slices
    data = itk.array_view_from_image(itk.imread(files))
    return data.dtype.kind in "fc" and not bool(np.isfinite(data).all())


def has_non_finite(path) -> bool:
    if Path(path).is_dir():
        return _dicom_has_non_finite(path)
    if is_nifti(path):
        image = nib.load(str(path))
        slope, inter = image.header.get_slope_inter()
        scaling_finite = all(v is None or math.isfinite(v) for v in (slope, inter))
        if image.header.get_data_dtype().kind in "iub" and scaling_finite:
            return False  # integer voxels with finite scaling cannot be NaN/Inf: skip reading the data
        data = np.asanyarray(image.dataobj)
    else:
        import itk

        io = _itk_image_io(path)
        if io.GetComponentTypeAsString(io.GetComponentType()) in _ITK_INTEGER_TYPES:
            return False  # integer voxels cannot be NaN/Inf: a whole CT need not be read for that
        data = itk.array_view_from_image(itk.imread(str(path)))
    return data.dtype.kind in "fc" and not bool(np.isfinite(data).all())
