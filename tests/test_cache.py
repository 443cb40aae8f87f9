"""Preprocessed volumes cached on disk, memory-mapped: what a RAM cache gives, without holding every volume."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from monai.data import CacheDataset

from meddet.data import generate_dataset, load_datalist
from meddet.data.cache import MappedPersistentDataset, cached_dataset
from meddet.data.transforms import training_transforms, validation_transforms

PLAN = dict(spacing=(1.5, 1.5, 3.0), intensity_clip=(-1000.0, 500.0), intensity_mean=-450.0, intensity_std=420.0)


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_data")
    path = generate_dataset(str(root), "easy", num_training=2, num_validation=0, seed=4)
    return load_datalist(path, str(root), "training")


def _cached_files(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".pt"))


def test_disk_cache_gives_the_ram_cache_samples_and_reads_hits_memory_mapped(datalist, tmp_path, monkeypatch):
    ram = cached_dataset(datalist, validation_transforms(**PLAN), cache_rate=1.0)
    assert isinstance(ram, CacheDataset)
    first = cached_dataset(datalist, validation_transforms(**PLAN), cache_dir=str(tmp_path / "cache"))
    assert isinstance(first, MappedPersistentDataset)
    written = [first[i] for i in range(len(datalist))]  # misses: preprocessed and written
    assert len(_cached_files(tmp_path / "cache")) == len(datalist)

    loads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(kwargs) or original(*args, **kwargs))
    second = cached_dataset(datalist, validation_transforms(**PLAN), cache_dir=str(tmp_path / "cache"))
    for index in range(len(datalist)):
        hit = second[index]
        for reference in (written[index], ram[index]):
            torch.testing.assert_close(hit["image"].as_tensor(), reference["image"].as_tensor())
            torch.testing.assert_close(hit["box"], reference["box"])
            np.testing.assert_allclose(hit["image"].affine, reference["image"].affine)
    assert len(loads) == len(datalist) and all(kwargs.get("mmap") for kwargs in loads)


def test_training_patches_from_the_disk_cache_equal_those_from_ram(datalist, tmp_path):
    def patches(dataset):
        dataset.transform.set_random_state(7)
        return [dataset[i % len(datalist)][0] for i in range(6)]

    chain = dict(patch_size=(32, 32, 32), **PLAN)
    cached_dataset(datalist, training_transforms(**chain), cache_dir=str(tmp_path))[0]  # fill the cache
    from_ram = patches(cached_dataset(datalist, training_transforms(**chain)))
    from_disk = patches(cached_dataset(datalist, training_transforms(**chain), cache_dir=str(tmp_path)))
    for a, b in zip(from_ram, from_disk):
        torch.testing.assert_close(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
        torch.testing.assert_close(a["box"], b["box"])
        assert torch.equal(a["label"], b["label"])


def test_changed_settings_or_sources_are_preprocessed_again(datalist, tmp_path):
    entry = [dict(datalist[0])]
    cached_dataset(entry, validation_transforms(**PLAN), cache_dir=str(tmp_path))[0]
    assert len(_cached_files(tmp_path)) == 1
    cached_dataset(entry, validation_transforms(**{**PLAN, "spacing": (2.0, 2.0, 3.0)}),
                   cache_dir=str(tmp_path))[0]
    assert len(_cached_files(tmp_path)) == 2  # another spacing is another cache entry
    image = entry[0]["image"]
    os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 10**9))
    cached_dataset(entry, validation_transforms(**PLAN), cache_dir=str(tmp_path))[0]
    assert len(_cached_files(tmp_path)) == 3  # a replaced image is not served from the old entry


def test_a_damaged_cache_file_is_recomputed_with_a_warning(datalist, tmp_path):
    entry = [dict(datalist[0])]
    reference = cached_dataset(entry, validation_transforms(**PLAN), cache_dir=str(tmp_path))[0]
    (name,) = _cached_files(tmp_path)
    with open(tmp_path / name, "r+b") as handle:
        handle.truncate(100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = cached_dataset(entry, validation_transforms(**PLAN), cache_dir=str(tmp_path))[0]
    assert any(name in str(w.message) and "unreadable" in str(w.message) for w in caught)
    torch.testing.assert_close(again["image"].as_tensor(), reference["image"].as_tensor())
    assert os.path.getsize(tmp_path / name) > 100  # rewritten whole
