"""Where preprocessed volumes wait between patches: in RAM (MONAI's CacheDataset) or on disk, memory-mapped.

A chest CT resampled to the bundles' spacing is ~38 M voxels, 150 MB as float32: LUNA16's 888 scans would need
~130 GB of RAM in a CacheDataset. With `cache_dir` set, each volume's deterministic preprocessing (load, reorient,
resample, normalise, boxes to voxels) is written once to `cache_dir` and read back memory-mapped, so a 128^3
patch reads the pages it covers instead of the whole volume, and the page cache, shared by all loader workers,
keeps what fits in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Callable, Sequence

import torch
from monai.data import CacheDataset, PersistentDataset
from monai.data.utils import pickle_hashing

__all__ = ["MappedPersistentDataset", "cached_dataset", "source_hashing"]


def _file_stamps(value) -> list:
    """(path, size, mtime) of every existing file named in a datalist entry's values."""
    paths = value if isinstance(value, (list, tuple)) else [value]
    stamps = []
    for path in paths:
        if isinstance(path, (str, os.PathLike)) and os.path.exists(path):
            info = os.stat(path)
            stamps.append((os.fspath(path), info.st_size, info.st_mtime_ns))
    return stamps


def source_hashing(item: dict) -> bytes:
    """Cache key of a datalist entry: its content plus the size and modification time of the files it names, so
    a replaced image is preprocessed again instead of served stale."""
    stamps = {key: _file_stamps(value) for key, value in sorted(item.items(), key=lambda kv: str(kv[0]))}
    digest = hashlib.md5(pickle_hashing(item) + json.dumps(stamps, default=str).encode("utf-8"))
    return digest.hexdigest().encode("utf-8")


class MappedPersistentDataset(PersistentDataset):
    """MONAI's PersistentDataset whose cache hits are loaded memory-mapped (`torch.load(mmap=True)`): tensors are
    read from disk page by page as they are touched. The transforms before the first random one are cached; their
    settings are part of the cache key (`hash_transform`), and so are the source files' sizes and times."""

    def __init__(self, data: Sequence, transform, cache_dir: str | os.PathLike,
                 hash_func: Callable[..., bytes] = source_hashing, **kwargs):
        kwargs.setdefault("hash_transform", pickle_hashing)
        kwargs.setdefault("track_meta", True)  # the image stays a MetaTensor: its affine maps boxes back to the world
        super().__init__(data=data, transform=transform, cache_dir=cache_dir, hash_func=hash_func, **kwargs)

    def _cachecheck(self, item_transformed):
        hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
        if hashfile.is_file():
            try:
                return torch.load(hashfile, mmap=True, weights_only=False)
            except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as error:
                # cut short or damaged (a killed writer, a full disk): computed again below and rewritten
                warnings.warn(f"cached volume {hashfile} is unreadable ({type(error).__name__}: {error}); "
                              "preprocessing it again")
                hashfile.unlink(missing_ok=True)
        return super()._cachecheck(item_transformed)


def cached_dataset(data: Sequence, transform, cache_rate: float = 1.0, cache_dir: str = "", num_workers: int = 0):
    """The bundles' training/validation dataset: `cache_dir` "" keeps the preprocessed volumes in RAM (a
    CacheDataset of `cache_rate`); a folder keeps them on disk, memory-mapped (`MappedPersistentDataset`)."""
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        return MappedPersistentDataset(data=data, transform=transform, cache_dir=cache_dir)
    return CacheDataset(data=data, transform=transform, cache_rate=cache_rate, num_workers=num_workers)
