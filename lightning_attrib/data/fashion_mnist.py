"""Fashion-MNIST from local IDX files (numpy only, no download): the Debian package `dataset-fashion-mnist`.

    x, y = load_fashion_mnist("train")             # x float32 (60000, 1, 28, 28) in [0, 1], y int64 (60000,)
    x, y = load_fashion_mnist("test", limit=1000)  # the first 1000 of t10k (only those bytes are decoded)

Where the files are looked up, first match wins: the `root` argument, the environment variable
`LIGHTNING_ATTRIB_FASHION_MNIST`, then `/usr/share/datasets/fashion-mnist` (where
`apt-get install -y dataset-fashion-mnist` puts them). A directory must hold
`{train,t10k}-{images-idx3,labels-idx1}-ubyte` files, gzipped (`.gz`, as shipped) or not.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

ENV_VAR = "LIGHTNING_ATTRIB_FASHION_MNIST"
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}
# IDX type codes (byte 3 of the magic number) -> big-endian numpy dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The directory Fashion-MNIST is read from: `root`, else $LIGHTNING_ATTRIB_FASHION_MNIST, else the Debian path."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path(DEFAULT_DIR)


def _missing_error(directory: Path, name: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Fashion-MNIST file {name}(.gz) not found in {directory}. Install the Debian package "
        f"`{DEBIAN_PACKAGE}` (`apt-get install -y {DEBIAN_PACKAGE}`, files in {DEFAULT_DIR}), or point the "
        f"`root=` argument or the environment variable {ENV_VAR} at a directory holding "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz."
    )


def _find(directory: Path, name: str) -> Path:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    raise _missing_error(directory, name)


def read_idx(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """An IDX file (gzipped when its name ends in .gz) as a numpy array in native byte order.

    `limit` keeps the first `limit` entries along the first axis and decodes only their bytes.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        head = fh.read(4)
        if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
            raise ValueError(f"{path} is not an IDX file (magic bytes {head.hex() or 'missing'})")
        dtype, ndim = np.dtype(_IDX_DTYPES[head[2]]), head[3]
        raw_dims = fh.read(4 * ndim)
        if len(raw_dims) != 4 * ndim:
            raise ValueError(f"{path}: truncated IDX header")
        dims = [int(d) for d in np.frombuffer(raw_dims, dtype=">u4")]
        if limit is not None and ndim > 0:
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")
            dims[0] = min(dims[0], int(limit))
        count = int(np.prod(dims)) if dims else 1
        data = fh.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise ValueError(f"{path}: truncated IDX data ({len(data)} of {count * dtype.itemsize} bytes for shape {dims})")
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("=")).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None,
                       limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a Fashion-MNIST split: x float32 (n, 1, 28, 28) scaled to [0, 1], y int64 (n,) in 0..9.

    split: "train" (60,000) or "test" / "t10k" (10,000); limit: keep the first `limit` examples (file order).
    Raises FileNotFoundError naming the Debian package and the overrides when the files are absent.
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test' (alias 't10k'), got {split!r}")
    directory = fashion_mnist_dir(root)
    prefix = _PREFIX[split]
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"), limit)
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"), limit)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split} files in {directory} disagree: images {images.shape}, labels {labels.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
