"""One synthetic CT volume as NIfTI, MetaImage, NRRD and a DICOM series folder: same header, same loaded
array, same RAS world frame, same bundle detections; broken DICOM folders are reported by name and problem.

The volume is stored with a coronal orientation (a permutation with a flip, exact in every format), anisotropic
spacing and a non-zero origin, so a reader that drops the direction, swaps axes or forgets the LPS -> RAS
conversion lands the lesions elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_helpers import bundle_dir, run_bundle
from meddet.data import DatalistError, load_datalist
from meddet.data.image_io import ImageFormatError, has_non_finite, image_exists, read_header
from meddet.data.transforms import inference_transforms

pytestmark = pytest.mark.filterwarnings("ignore:builtin type")  # ITK's SWIG bindings warn on import

SHAPE = (40, 36, 24)  # index order i, j, k
SPACING = np.array([0.8, 0.7, 2.5])
ORIGIN_LPS = np.array([12.5, -30.25, 40.0])
# coronal slices: rows run to the patient's left, columns downwards, slices step posterior (LPS world axes);
# the slice axis is row x column, as a DICOM series reader builds it
DIRECTION_LPS = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
AFFINE_LPS = np.eye(4)
AFFINE_LPS[:3, :3] = DIRECTION_LPS * SPACING
AFFINE_LPS[:3, 3] = ORIGIN_LPS
AFFINE_RAS = np.diag([-1.0, -1.0, 1.0, 1.0]) @ AFFINE_LPS
# (voxel centre, semi-axes in mm) of the bright ellipsoids; centres on voxel centres keep them symmetric
LESIONS = [((20, 15, 11), (5.0, 4.0, 6.0)), ((9, 27, 18), (4.0, 4.0, 5.0))]
BACKGROUND, LESION_HU = -1000, 100
FORMATS = ("nifti", "mhd", "nrrd", "dicom")
BUNDLE = "retinaunet_resencl_scratch_detection"
SMOKE_SPACING, CLIP, MEAN, STD = (1.5, 1.5, 2.0), (-1000.0, 500.0), -450.0, 420.0
UID_ROOT = "1.2.826.0.1.3680043.2.1125.424242"


def _lesion_world_centres() -> np.ndarray:
    return np.array([(AFFINE_RAS @ [*centre, 1.0])[:3] for centre, _ in LESIONS])


def _ct_volume(shape=SHAPE) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    data = np.full(shape, BACKGROUND, dtype=np.int16)
    for centre, radii in LESIONS:
        inside = sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(grid, centre, SPACING, radii)) <= 1.0
        data[inside] = LESION_HU
    return data


def _itk_image(data: np.ndarray, spacing, origin, direction):
    import itk

    image = itk.image_from_array(np.ascontiguousarray(data.T))  # ITK arrays are (k, j, i)
    image.SetSpacing([float(s) for s in spacing])
    if data.ndim == 3:
        image.SetOrigin([float(o) for o in origin])
        image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction, dtype=np.float64)))
    return image


def write_nifti(path: Path, data: np.ndarray, affine_ras: np.ndarray = AFFINE_RAS) -> str:
    nib.save(nib.Nifti1Image(data, affine_ras), str(path))
    return str(path)


def write_itk(path: Path, data: np.ndarray) -> str:
    """MetaImage or NRRD by extension; ITK stores the LPS geometry."""
    import itk

    itk.imwrite(_itk_image(data, SPACING, ORIGIN_LPS, DIRECTION_LPS), str(path))
    return str(path)


def _format(values) -> str:
    return "\\".join(f"{v:.10g}" for v in values)


def write_dicom_series(folder: Path, data: np.ndarray, series: int = 1, shifts: dict | None = None,
                       prefix: str = "") -> str:
    """One CT file per k-slice through ITK's GDCMImageIO, geometry in the per-slice tags.

    `shifts` {slice index: mm} moves a slice's ImagePositionPatient along the slice normal.
    """
    import itk

    folder.mkdir(parents=True, exist_ok=True)
    row, column, normal = DIRECTION_LPS.T
    for k in range(data.shape[2]):
        position = ORIGIN_LPS + normal * (SPACING[2] * k + (shifts or {}).get(k, 0.0))
        image = _itk_image(data[:, :, k], SPACING[:2], None, None)
        tags = {
            "0008|0060": "CT",
            "0020|000d": f"{UID_ROOT}.1",
            "0020|000e": f"{UID_ROOT}.2.{series}",
            "0020|0011": str(series),
            "0008|0018": f"{UID_ROOT}.3.{series}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": _format(position),
            "0020|0037": _format([*row, *column]),
            "0028|0030": _format([SPACING[1], SPACING[0]]),  # DICOM: row spacing (j), then column spacing (i)
            "0018|0050": _format([SPACING[2]]),
            "0028|1052": "0",
            "0028|1053": "1",
        }
        meta = image.GetMetaDataDictionary()
        for key, value in tags.items():
            meta[key] = value
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()  # write our Study/Series/SOP UIDs instead of fresh ones
        itk.ImageFileWriter.New(Input=image, FileName=str(folder / f"{prefix}{k:03d}.dcm"), ImageIO=io,
                                UseCompression=False).Update()
    return str(folder)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("formats")
    data = _ct_volume()
    return {
        "nifti": write_nifti(root / "ct.nii.gz", data),
        "mhd": write_itk(root / "ct.mhd", data),
        "nrrd": write_itk(root / "ct.nrrd", data),
        "dicom": write_dicom_series(root / "ct_dicom", data),
    }


def test_every_format_has_the_same_header_as_monai_loads_it(volumes):
    from monai.transforms import LoadImage

    for name, path in volumes.items():
        assert image_exists(path), name
        shape, affine = read_header(path)
        assert shape == SHAPE, name
        np.testing.assert_allclose(affine, AFFINE_RAS, atol=1e-3, err_msg=name)
        loaded = LoadImage(image_only=True)(path)  # MONAI's own reader choice: nibabel or ITK
        assert tuple(loaded.shape) == shape, name
        np.testing.assert_allclose(np.asarray(loaded.affine), affine, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(np.asarray(loaded), _ct_volume(), err_msg=name)
        assert has_non_finite(path) is False


def _lesion_centroid(image: torch.Tensor, affine: np.ndarray, centre: np.ndarray, radius_mm: float = 10.0):
    """Intensity centroid (RAS mm) of the voxels within `radius_mm` of `centre`, above the background."""
    values = image[0].numpy().astype(np.float64)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in values.shape], indexing="ij"), -1).reshape(-1, 3)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    weights = (values - values.min()).reshape(-1) * (np.linalg.norm(world - centre, axis=1) <= radius_mm)
    return (world * weights[:, None]).sum(0) / weights.sum()


def test_preprocessed_images_agree_and_lesions_sit_at_their_world_centres(volumes):
    transform = inference_transforms(SMOKE_SPACING, CLIP, MEAN, STD)
    loaded = {name: transform({"image": path})["image"] for name, path in volumes.items()}
    reference = loaded["nifti"]
    # to RAS: i (runs R->L) is flipped, k (A->P) is flipped and becomes axis 2, j (S->I) is flipped and axis 3
    assert reference.shape[1:] == (22, 39, 13)
    for name, image in loaded.items():
        assert image.shape == reference.shape, name
        np.testing.assert_allclose(np.asarray(image.affine), np.asarray(reference.affine), atol=1e-4, err_msg=name)
        np.testing.assert_allclose(image.numpy(), reference.numpy(), atol=1e-4, err_msg=name)
        affine = np.asarray(image.affine, dtype=np.float64)
        np.testing.assert_allclose(np.diag(affine)[:3], SMOKE_SPACING, atol=1e-4)  # RAS: positive diagonal
        for centre in _lesion_world_centres():
            np.testing.assert_allclose(_lesion_centroid(image, affine, centre), centre, atol=0.5, err_msg=name)


def _save_random_smoke_network(models_dir: Path) -> None:
    from monai.bundle import ConfigParser

    configs = [os.path.join(bundle_dir(BUNDLE), "configs", name) for name in ("inference.json", "smoke.json")]
    parser = ConfigParser()
    parser.read_config(configs)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    models_dir.mkdir(parents=True)
    # CheckpointLoader(load_dict={"model": network}) accepts a bare state dict for a single object
    torch.save(network.state_dict(), models_dir / "model.pt")


def _assert_same_detections(reference: dict, other: dict, name: str) -> None:
    boxes, scores = np.asarray(reference["box"]).reshape(-1, 6), np.asarray(reference["label_scores"])
    other_boxes, other_scores = np.asarray(other["box"]).reshape(-1, 6), np.asarray(other["label_scores"])
    assert len(boxes) == len(other_boxes) > 0, name
    unmatched = list(np.argsort(-other_scores, kind="stable"))
    # matched one to one in score order; near-equal scores may swap places between formats
    for box, score in zip(boxes[np.argsort(-scores, kind="stable")], np.sort(scores)[::-1]):
        match = [i for i in unmatched if abs(other_scores[i] - score) <= 1e-4
                 and np.abs(other_boxes[i] - box).max() <= 0.5]
        assert match, f"{name}: no box within 0.5 mm / score within 1e-4 of {box.tolist()} ({score:.5f})"
        unmatched.remove(match[0])


def test_bundle_inference_gives_the_same_world_boxes_for_every_format(volumes, tmp_path):
    data_dir = Path(volumes["nifti"]).parent
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"validation": [{"image": Path(volumes[name]).name} for name in FORMATS]}))
    run_root = tmp_path / "run"
    _save_random_smoke_network(run_root / "models")
    output_dir = tmp_path / "predictions"
    run_bundle(BUNDLE, ["configs/inference.json", "configs/smoke.json"], str(tmp_path / "inference.log"),
               timeout=300, bundle_root=run_root, dataset_dir=data_dir, data_list_file_path=datalist,
               output_dir=output_dir, score_thresh=0.0)
    with open(output_dir / "predictions.json") as f:
        predictions = {os.path.realpath(entry["image"]): entry for entry in json.load(f)}
    by_format = {name: predictions[os.path.realpath(volumes[name])] for name in FORMATS}
    for name in FORMATS[1:]:
        _assert_same_detections(by_format["nifti"], by_format[name], name)


# ---- broken DICOM folders ------------------------------------------------------------------------------------


def _small_volume() -> np.ndarray:
    return _ct_volume((12, 10, 8))


def _format_error(folder) -> str:
    with pytest.raises(ImageFormatError) as info:
        read_header(folder)
    message = str(info.value)
    assert str(folder) in message
    return message


def test_folder_with_two_series_lists_them(tmp_path):
    folder = tmp_path / "two"
    write_dicom_series(folder, _small_volume(), series=1, prefix="a")
    write_dicom_series(folder, _small_volume()[:, :, :5], series=2, prefix="b")
    message = _format_error(folder)
    assert "holds 2 series" in message
    assert f"{UID_ROOT}.2.1 (8 slices)" in message and f"{UID_ROOT}.2.2 (5 slices)" in message
    assert "own folder" in message


def test_series_with_a_missing_slice_says_where(tmp_path):
    folder = Path(write_dicom_series(tmp_path / "gap", _small_volume()))
    (folder / "004.dcm").unlink()
    message = _format_error(folder)
    assert "1 slice(s) missing" in message
    assert "between 003.dcm" in message and "and 005.dcm" in message and "2.5 mm" in message


def test_series_with_unequal_spacing_says_which_gap(tmp_path):
    folder = write_dicom_series(tmp_path / "uneven", _small_volume(), shifts={5: 0.8})
    message = _format_error(folder)
    assert "unequal slice spacing" in message and "missing" not in message
    assert "3.3 mm between 004.dcm and 005.dcm" in message and "1.7 mm between 005.dcm and 006.dcm" in message


def test_folder_without_a_volume(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a DICOM file")
    assert image_exists(empty)  # so the datalist reports why, not "not found"
    assert "no DICOM files" in _format_error(empty)
    single = write_dicom_series(tmp_path / "single", _small_volume()[:, :, :1])
    assert "1 slice file; a 3D volume needs at least 2" in _format_error(single)


def test_datalist_reports_broken_dicom_folders_by_name(tmp_path, volumes):
    two = tmp_path / "two"
    write_dicom_series(two, _small_volume(), series=1, prefix="a")
    write_dicom_series(two, _small_volume(), series=2, prefix="b")
    gap = Path(write_dicom_series(tmp_path / "gap", _small_volume()))
    (gap / "002.dcm").unlink()
    shutil.copytree(volumes["dicom"], tmp_path / "good")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "two"}, {"image": "gap"}, {"image": "good"}]}))
    with pytest.raises(DatalistError) as info:
        load_datalist(datalist)
    message = str(info.value)
    assert "2 problem(s)" in message
    assert f"item 0 (image {two.resolve()}): DICOM series folder {two.resolve()} holds 2 series" in message
    assert f"item 1 (image {gap.resolve()}): DICOM series folder {gap.resolve()}: 1 slice(s) missing" in message
    datalist.write_text(json.dumps({"training": [{"image": "good", "box": [[*_lesion_world_centres()[0], 8, 8, 8]],
                                                  "label": [0]}]}))
    assert load_datalist(datalist)[0]["box"].shape == (1, 6)
