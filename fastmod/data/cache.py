"""Image sources for the datasets: PNG files, an HDF5 cache of decoded images, and
HDF5 feature maps.  HDF5 files are opened lazily, once per process, so datasets
can be sent to DataLoader worker processes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from fastmod.data.clevr import load_image
from fastmod.data.errors import DataError, MissingDataError
from fastmod.data.transforms import resize_uint8


class LazyH5:
    """An h5py file opened read-only on first use in each process."""

    def __init__(self, path):
        self.path = Path(path)
        self._file, self._pid = None, None

    def file(self):
        import h5py
        if self._file is None or self._pid != os.getpid():
            try:
                self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
            except FileNotFoundError:
                raise MissingDataError(f"HDF5 file {self.path} does not exist") from None
            except OSError as e:
                raise DataError(f"{self.path} is not a readable HDF5 file: {e}") from None
        return self._file

    def dataset(self, key: str):
        f = self.file()
        if key not in f:
            raise DataError(f"HDF5 file {self.path} has no dataset '{key}' (has {sorted(f.keys())})")
        return f[key]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid = None, None

    def __getstate__(self):
        return {"path": self.path, "_file": None, "_pid": None}


class PngImages:
    """Decode + resize PNGs: ``get(image_index)`` -> uint8 [3, S, S]."""

    def __init__(self, directory: Path, filenames: dict[int, str], image_size: int):
        self.directory, self.filenames, self.image_size = Path(directory), filenames, image_size

    def path(self, image_index: int) -> Path:
        return self.directory / self.filenames[image_index]

    def get(self, image_index: int) -> np.ndarray:
        return resize_uint8(load_image(self.path(image_index), f"image_index {image_index}"), self.image_size)


class H5Images:
    """Decoded images from an HDF5 cache (``images`` uint8 [N,3,S,S], ``image_index`` [N])."""

    def __init__(self, path):
        self.h5 = LazyH5(path)
        idx = self.h5.dataset("image_index")[()]
        self.row = {int(i): r for r, i in enumerate(idx)}

    def get(self, image_index: int) -> np.ndarray:
        return self.h5.dataset("images")[self.row[image_index]]


def default_cache_path(data_dir: Path, split: str, image_size: int) -> Path:
    """``DATA/cache/images_{split}_{S}.h5``, or under ``$FASTMOD_CACHE`` if DATA is read-only."""
    d = Path(data_dir) / "cache"
    if os.access(data_dir, os.W_OK) and (not d.exists() or os.access(d, os.W_OK)):
        return d / f"images_{split}_{image_size}.h5"
    from fastmod.data.default import cache_root
    tag = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]
    return cache_root() / "images" / f"{Path(data_dir).name}-{tag}_{split}_{image_size}.h5"


def _cache_matches(path: Path, indices: list[int], image_size: int) -> bool:
    import h5py
    try:
        with h5py.File(path, "r") as f:
            ok = (f.attrs.get("image_size") == image_size and "images" in f and "image_index" in f
                  and set(indices) <= set(int(i) for i in f["image_index"][()]))
    except OSError:
        return False
    return bool(ok)


def open_image_cache(path, png: PngImages, indices: list[int], progress: bool = True) -> H5Images:
    """The HDF5 cache at ``path`` holding ``indices`` at ``png.image_size``; built from
    the PNGs (decoding each once, so corrupt files are found here) when absent or stale.
    Written to a temporary file and renamed, so an interrupted build is not reused."""
    import h5py
    path = Path(path)
    if not _cache_matches(path, indices, png.image_size):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        s = png.image_size
        it = indices
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(indices, desc=f"caching images -> {path.name}", unit="img")
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["image_size"] = s
                f.create_dataset("image_index", data=np.asarray(indices, dtype=np.int64))
                ds = f.create_dataset("images", (len(indices), 3, s, s), dtype=np.uint8,
                                      chunks=(1, 3, s, s))
                for r, i in enumerate(it):
                    ds[r] = png.get(i)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return H5Images(path)


class H5Features:
    """Precomputed feature maps: ``features`` [N_images, C, h, w] indexed by image index."""

    def __init__(self, path, max_index: int):
        self.h5 = LazyH5(path)
        ds = self.h5.dataset("features")
        if ds.ndim != 4:
            raise DataError(f"{path}: 'features' must be 4-D [N, C, h, w], got shape {ds.shape}")
        if max_index >= ds.shape[0]:
            raise DataError(f"{path}: image index {max_index} is out of range for 'features' "
                            f"with {ds.shape[0]} rows")
        self.shape = tuple(ds.shape)

    def get(self, image_index: int) -> np.ndarray:
        return self.h5.dataset("features")[image_index]
