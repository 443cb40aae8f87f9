"""Datalist loading and validation: every bad input is reported with file, item, image and problem."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddet.data import DatalistError, load_datalist, read_image_geometry

# non-diagonal affine: world x = -2 k + 40, y = 1.5 i - 10, z = 1 j + 5
AFFINE = np.array([[0, 0, -2.0, 40], [1.5, 0, 0, -10], [0, 1.0, 0, 5], [0, 0, 0, 1]])
SHAPE = (10, 12, 8)
# voxel box [2, 3, 1, 6, 7, 5] -> continuous centre (3.5, 4.5, 2.5): world (35, -4.75, 9.5), size (8, 6, 4)
INSIDE_BOX = [35.0, -4.75, 9.5, 8.0, 6.0, 4.0]


def _image(root: Path, name: str, shape=SHAPE, dtype=np.int16, affine=AFFINE, fill=None) -> str:
    data = np.zeros(shape, dtype=dtype) if fill is None else np.full(shape, fill, dtype=dtype)
    nib.save(nib.Nifti1Image(data, affine), str(root / name))
    return name


def _datalist(root: Path, items: list, key: str = "training") -> Path:
    path = root / "datalist.json"
    path.write_text(json.dumps({key: items}))
    return path


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(DatalistError) as info:
        load_datalist(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    return message


def test_valid_datalist_with_negative_cases_and_channels(tmp_path):
    single = _image(tmp_path, "a.nii.gz")
    channel_last = _image(tmp_path, "b.nii.gz", shape=SHAPE + (2,), dtype=np.float32)
    channel_files = [_image(tmp_path, "c0.nii"), _image(tmp_path, "c1.nii")]
    path = _datalist(tmp_path, [
        {"image": single, "box": [INSIDE_BOX, [37.0, -4.0, 10.0, 2.0, 3.0, 2.0]], "label": [0, 1], "case": "a"},
        {"image": channel_last},  # negative case without boxes
        {"image": channel_files, "box": [], "label": []},  # negative case with empty lists
    ])
    items = load_datalist(path, num_classes=2)
    assert [item["box"].shape for item in items] == [(2, 6), (0, 6), (0, 6)]
    assert all(item["box"].dtype == np.float32 and item["label"].dtype == np.int64 for item in items)
    np.testing.assert_array_equal(items[0]["label"], [0, 1])
    np.testing.assert_allclose(items[0]["box"][0], INSIDE_BOX)
    assert items[0]["image"] == str((tmp_path / single).resolve()) and items[0]["case"] == "a"
    assert items[2]["image"] == [str((tmp_path / f).resolve()) for f in channel_files]


def test_dataset_dir_overrides_the_datalist_folder(tmp_path):
    (tmp_path / "data").mkdir()
    _image(tmp_path / "data", "a.nii.gz")
    path = _datalist(tmp_path, [{"image": "a.nii.gz", "box": [INSIDE_BOX], "label": [0]}])
    assert "image file not found" in _error(path)
    items = load_datalist(path, dataset_dir=tmp_path / "data")
    assert Path(items[0]["image"]).parent == (tmp_path / "data").resolve()


def test_read_image_geometry_reads_the_nifti_header(tmp_path):
    _image(tmp_path, "a.nii.gz", shape=SHAPE + (3,))
    shape, affine = read_image_geometry(tmp_path / "a.nii.gz")
    assert shape == SHAPE
    np.testing.assert_allclose(affine, AFFINE)


def test_missing_image(tmp_path):
    path = _datalist(tmp_path, [{"image": "missing.nii.gz"}])
    message = _error(path)
    assert f"item 0 (image {tmp_path.resolve() / 'missing.nii.gz'})" in message
    assert "image file not found" in message


def test_unreadable_image(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file")
    message = _error(_datalist(tmp_path, [{"image": "broken.nii.gz"}]))
    assert "item 0" in message and "broken.nii.gz" in message and "cannot read image" in message


def test_two_dimensional_image(tmp_path):
    _image(tmp_path, "flat.nii.gz", shape=(10, 12))
    message = _error(_datalist(tmp_path, [{"image": "flat.nii.gz"}]))
    assert "item 0" in message and "flat.nii.gz" in message
    assert "is 2D" in message and "3D volume is required" in message


def test_single_slice_image(tmp_path):
    _image(tmp_path, "slice.nii.gz", shape=(10, 12, 1))
    message = _error(_datalist(tmp_path, [{"image": "slice.nii.gz"}]))
    assert "slice.nii.gz" in message and "a 2D slice, not a 3D volume" in message


def test_image_with_more_than_one_non_spatial_dimension(tmp_path):
    _image(tmp_path, "five.nii.gz", shape=SHAPE + (2, 2))
    message = _error(_datalist(tmp_path, [{"image": "five.nii.gz"}]))
    assert "five.nii.gz" in message and "more than one non-spatial dimension" in message


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_image(tmp_path, bad_value):
    data = np.zeros(SHAPE, np.float32)
    data[3, 4, 5] = bad_value
    nib.save(nib.Nifti1Image(data, AFFINE), str(tmp_path / "bad.nii.gz"))
    message = _error(_datalist(tmp_path, [{"image": "bad.nii.gz"}]))
    assert "item 0" in message and "bad.nii.gz" in message and "contains NaN or Inf values" in message


def test_box_outside_image(tmp_path):
    _image(tmp_path, "a.nii.gz")
    # i spans world y = 1.5 i - 10 over [-10.75, 4.25): shifted by 6.5 voxels the box ends 2.5 voxels past
    # the border, by 4.5 voxels only 0.5 (within the 1 voxel tolerance)
    outside = [35.0, -4.75 + 1.5 * 6.5, 9.5, 8.0, 6.0, 4.0]
    within_tolerance = [35.0, -4.75 + 1.5 * 4.5, 9.5, 8.0, 6.0, 4.0]
    path = _datalist(tmp_path, [{"image": "a.nii.gz", "box": [within_tolerance, outside], "label": [0, 0]}])
    message = _error(path)
    assert "item 0" in message and "a.nii.gz" in message
    assert "box 1 lies outside the image" in message and "box 0 " not in message


def test_box_with_non_positive_size(tmp_path):
    _image(tmp_path, "a.nii.gz")
    path = _datalist(tmp_path, [{"image": "a.nii.gz", "box": [[35.0, -4.75, 9.5, 8.0, 0.0, 4.0]], "label": [0]}])
    message = _error(path)
    assert "item 0" in message and "a.nii.gz" in message and "box 0 has non-positive size" in message


def test_box_label_count_mismatch(tmp_path):
    _image(tmp_path, "a.nii.gz")
    path = _datalist(tmp_path, [{"image": "a.nii.gz", "box": [INSIDE_BOX, INSIDE_BOX], "label": [0]}])
    message = _error(path)
    assert "item 0" in message and "2 boxes but 1 labels" in message


def test_boxes_without_labels(tmp_path):
    _image(tmp_path, "a.nii.gz")
    message = _error(_datalist(tmp_path, [{"image": "a.nii.gz", "box": [INSIDE_BOX]}]))
    assert "1 boxes but 0 labels" in message


def test_label_outside_range(tmp_path):
    _image(tmp_path, "a.nii.gz")
    path = _datalist(tmp_path, [{"image": "a.nii.gz", "box": [INSIDE_BOX, INSIDE_BOX], "label": [0, 2]}])
    message = _error(path, num_classes=2)
    assert "item 0" in message and "label 1 = 2 is outside [0, 2)" in message
    negative = _datalist(tmp_path, [{"image": "a.nii.gz", "box": [INSIDE_BOX], "label": [-1]}])
    assert "label 0 = -1 is outside >= 0" in _error(negative)
    fractional = _datalist(tmp_path, [{"image": "a.nii.gz", "box": [INSIDE_BOX], "label": [0.5]}])
    assert "label 0 = 0.5 is not an integer class id" in _error(fractional)


def test_wrong_box_length(tmp_path):
    _image(tmp_path, "a.nii.gz")
    path = _datalist(tmp_path, [{"image": "a.nii.gz", "box": [INSIDE_BOX, [1.0, 2.0, 3.0, 4.0, 5.0]], "label": [0, 0]}])
    message = _error(path)
    assert "item 0" in message and "box 1 has length 5; expected 6 values" in message
    flat = _datalist(tmp_path, [{"image": "a.nii.gz", "box": INSIDE_BOX, "label": [0]}])
    assert "got a flat list of 6 numbers" in _error(flat)


def test_channel_files_with_different_geometry(tmp_path):
    files = [_image(tmp_path, "c0.nii.gz"), _image(tmp_path, "c1.nii.gz", shape=(10, 12, 9))]
    message = _error(_datalist(tmp_path, [{"image": files}]))
    assert "channel files disagree on geometry" in message and "c1.nii.gz" in message


def test_multiple_problems_reported_together(tmp_path):
    _image(tmp_path, "a.nii.gz")
    path = _datalist(tmp_path, [
        {"image": "a.nii.gz", "box": [INSIDE_BOX], "label": [0]},
        {"image": "missing.nii.gz"},
        {"image": "a.nii.gz", "box": [[35.0, -4.75, 9.5, -1.0, 6.0, 4.0]], "label": [3]},
    ], key="validation")
    message = _error(path, data_list_key="validation", num_classes=2)
    assert "3 problem(s)" in message and "'validation'" in message
    assert "item 1" in message and "image file not found" in message
    assert "item 2" in message and "non-positive size" in message and "label 0 = 3 is outside [0, 2)" in message
    assert "item 0" not in message


def test_long_reports_are_truncated(tmp_path):
    path = _datalist(tmp_path, [{"image": f"missing{i}.nii.gz"} for i in range(25)])
    message = _error(path)
    assert "25 problem(s)" in message and "missing19.nii.gz" in message and "missing20.nii.gz" not in message
    assert "... and 5 more" in message


def test_check_images_false_opens_no_file(tmp_path):
    path = _datalist(tmp_path, [{"image": "missing.nii.gz", "box": [INSIDE_BOX], "label": [0]}])
    items = load_datalist(path, check_images=False)
    assert items[0]["box"].shape == (1, 6)
    bad = _datalist(tmp_path, [{"image": "missing.nii.gz", "box": [[1.0, 2.0]], "label": [0]}])
    assert "box 0 has length 2" in _error(bad, check_images=False)


def test_missing_key_and_bad_json(tmp_path):
    path = _datalist(tmp_path, [])
    assert "no list 'validation'" in _error(path, data_list_key="validation")
    path.write_text("{not json")
    assert "cannot be read as JSON" in _error(path)


@pytest.mark.filterwarnings("ignore:builtin type")  # emitted by ITK's SWIG bindings on import
def test_itk_format_matches_monai_itk_reader(tmp_path):
    import itk
    from monai.transforms import LoadImage

    data = np.zeros((8, 6, 5), np.float32)  # ITK array order (z, y, x): index sizes (5, 6, 8)
    image = itk.image_from_array(data)
    image.SetSpacing([0.5, 0.7, 2.0])
    image.SetOrigin([10.0, -5.0, 3.0])
    image.SetDirection(itk.matrix_from_array(np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])))
    itk.imwrite(image, str(tmp_path / "a.mhd"))
    shape, affine = read_image_geometry(tmp_path / "a.mhd")
    reference = LoadImage(image_only=True, reader="ITKReader")(str(tmp_path / "a.mhd"))
    assert shape == (5, 6, 8) == tuple(reference.shape)
    np.testing.assert_allclose(affine, np.asarray(reference.affine), atol=1e-6)
    assert load_datalist(_datalist(tmp_path, [{"image": "a.mhd"}]))[0]["box"].shape == (0, 6)


def test_ignore_regions_and_diameters_are_read_and_checked(tmp_path):
    image = _image(tmp_path, "a.nii.gz")
    good = {"image": image, "box": [INSIDE_BOX], "label": [0], "ignore_box": [INSIDE_BOX], "diameter_mm": [5.0]}
    item = load_datalist(_datalist(tmp_path, [good]))[0]
    assert item["ignore_box"].dtype == np.float32 and item["ignore_box"].shape == (1, 6)
    assert item["diameter_mm"] == [5.0]
    assert "ignore_box" not in load_datalist(_datalist(tmp_path, [dict(good, ignore_box=[])]))[0]
    bad = [dict(good, ignore_box=[[1.0, 2.0, 3.0]]), dict(good, diameter_mm=[5.0, 6.0]),
           dict(good, diameter_mm=[-1.0])]
    message = _error(_datalist(tmp_path, bad))
    assert "item 0" in message and "ignore_box 0 has length 3" in message
    assert "item 1" in message and "one diameter per box (1)" in message
    assert "item 2" in message and "not positive numbers: [-1.0]" in message


def test_metaimage_with_a_missing_or_short_data_file_is_named(tmp_path):
    import itk

    itk.imwrite(itk.image_from_array(np.zeros((8, 6, 5), np.int16)), str(tmp_path / "a.mhd"), compression=False)
    itk.imwrite(itk.image_from_array(np.zeros((8, 6, 5), np.int16)), str(tmp_path / "b.mhd"), compression=False)
    (tmp_path / "a.raw").unlink()
    (tmp_path / "b.raw").write_bytes(b"\0" * 100)
    message = _error(_datalist(tmp_path, [{"image": "a.mhd"}, {"image": "b.mhd"}]))
    assert f"{tmp_path / 'a.mhd'}: its data file" in message and "does not exist" in message
    assert f"{tmp_path / 'b.mhd'}: header DimSize [5, 6, 8] x MET_SHORT needs 480 bytes but b.raw has 100" in message


def test_a_nifti_cut_short_is_named_at_the_check_and_at_load_time(tmp_path):
    from monai.transforms import Compose

    from meddet.data.image_io import ImageFormatError
    from meddet.data.transforms import loading_transforms

    for name in ("cut.nii.gz", "cut.nii"):  # integer voxels: the check reads no voxel data for them
        nib.save(nib.Nifti1Image(np.arange(40 * 40 * 30, dtype=np.int16).reshape(40, 40, 30), AFFINE),
                 str(tmp_path / name))
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    message = _error(_datalist(tmp_path, [{"image": "cut.nii.gz"}, {"image": "cut.nii"}]))
    assert f"item 0 (image {tmp_path / 'cut.nii.gz'})" in message and "cut short or damaged" in message
    assert f"item 1 (image {tmp_path / 'cut.nii'})" in message and "cut short?" in message
    # an intact multi-member gzip file is not mistaken for a cut one
    import gzip
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.int16), AFFINE), str(tmp_path / "whole.nii"))
    raw = (tmp_path / "whole.nii").read_bytes()
    (tmp_path / "parts.nii.gz").write_bytes(gzip.compress(raw[:100]) + gzip.compress(raw[100:]))
    assert load_datalist(_datalist(tmp_path, [{"image": "parts.nii.gz"}]))[0]["image"].endswith("parts.nii.gz")

    # cut after the check (or never checked): loading names the file instead of a bare gzip EOFError
    chain = Compose(loading_transforms((1.0, 1.0, 1.0), (-1000, 1000), 0.0, 500.0, with_boxes=False))
    with pytest.raises(Exception) as error:
        chain({"image": str(tmp_path / "cut.nii.gz")})
    chained, current = [], error.value
    while current is not None:
        chained.append(current)
        current = current.__cause__ or current.__context__
    named = [e for e in chained if isinstance(e, ImageFormatError)]
    assert named and f"cannot load image {tmp_path / 'cut.nii.gz'}: EOFError" in str(named[0])


def test_boxes_given_in_voxels_get_a_hint(tmp_path):
    image = _image(tmp_path, "a.nii.gz")  # AFFINE puts the world extent far from the voxel index range
    message = _error(_datalist(tmp_path, [{"image": image, "box": [[5.0, 6.0, 4.0, 4.0, 4.0, 2.0]], "label": [0]}]))
    assert "read as voxel indices it would lie inside" in message
    far = _error(_datalist(tmp_path, [{"image": image, "box": [[500.0, 6.0, 4.0, 4.0, 4.0, 2.0]], "label": [0]}]))
    assert "lies outside the image" in far and "voxel indices" not in far


def test_an_uncaught_datalist_error_is_repeated_after_the_traceback(tmp_path):
    import subprocess
    import sys

    path = _datalist(tmp_path, [{"image": "missing.nii.gz"}])
    code = ("from meddet.data import load_datalist\n"
            "try:\n"
            f"    load_datalist({str(path)!r})\n"
            "except Exception as error:\n"
            "    raise RuntimeError('Failed to evaluate ConfigExpression' + ' (a long MONAI traceback)') from error\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert lines[-1].strip().startswith("item 0 (image") and "image file not found" in lines[-1]
    assert lines[-2].startswith("DatalistError: datalist") and "RuntimeError: Failed to evaluate" in result.stderr
