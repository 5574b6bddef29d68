"""Fashion-MNIST IDX loader: tiny IDX files written here (the suite never needs the Debian package)."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_attrib.data import load_fashion_mnist
from lightning_attrib.data.fashion_mnist import DEFAULT_DIR, ENV_VAR, fashion_mnist_dir, read_idx


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """uint8 array -> IDX (magic 0x00 0x00 0x08 ndim, big-endian uint32 dims, raw bytes)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def tiny_dataset(root: Path, n_train: int = 5, n_test: int = 3, compress: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the range
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_loader_reads_tiny_idx(tmp_path, compress):
    arrays = tiny_dataset(tmp_path, compress=compress)
    x, y = load_fashion_mnist("train", root=tmp_path)
    images, labels = arrays["train"]
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    np.testing.assert_allclose(x[:, 0].numpy(), images.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(y.numpy(), labels)
    xt, yt = load_fashion_mnist("test", root=tmp_path)
    assert xt.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(yt.numpy(), arrays["t10k"][1])
    # limit keeps the first rows, in file order
    xl, yl = load_fashion_mnist("t10k", root=tmp_path, limit=2)
    assert torch.equal(xl, xt[:2]) and torch.equal(yl, yt[:2])


def test_env_var_override(tmp_path, monkeypatch):
    tiny_dataset(tmp_path, n_train=4)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert fashion_mnist_dir() == tmp_path
    x, _ = load_fashion_mnist()
    assert x.shape == (4, 1, 28, 28)
    # the argument wins over the environment variable
    assert fashion_mnist_dir(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    monkeypatch.delenv(ENV_VAR)
    assert fashion_mnist_dir() == Path(DEFAULT_DIR)


def test_missing_files_error_names_package_and_override(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist("train")
    msg = str(err.value)
    assert "dataset-fashion-mnist" in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert ENV_VAR in msg and "root=" in msg
    assert "nothing-here" in msg
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)  # an empty directory


def test_bad_inputs(tmp_path):
    tiny_dataset(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x12\x34\x56\x78")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    trunc = tmp_path / "trunc"
    trunc.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(trunc)
    # images and labels of different lengths
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="disagree"):
        load_fashion_mnist("train", root=tmp_path)


def test_read_idx_other_dtypes(tmp_path):
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    p = tmp_path / "ints"
    p.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + arr.tobytes())
    out = read_idx(p)
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(read_idx(p, limit=1), [[0, 1, 2]])


@pytest.mark.skipif(not (Path(fashion_mnist_dir()) / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_real_fashion_mnist_shapes():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))
    x, y = load_fashion_mnist("train", limit=100)
    assert x.shape == (100, 1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert int(y[0]) == 9  # the first training image is an ankle boot
