"""The examples' data sets, read here once for the examples and the benchmarks: scikit-learn's
digits (shipped with scikit-learn: no download), and small readers for the standard MNIST and
CIFAR-10 files (no torchvision), with a download that is tried once and otherwise stops with a
message saying which files to put where.

* digits: the 1797 8×8 images of ``sklearn.datasets.load_digits``, pixels ``/ 16`` in [0, 1].

* MNIST: the four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, gzipped (``.gz``) or not.
* CIFAR-10: the python version's pickled batches ``data_batch_1`` … ``data_batch_5`` and
  ``test_batch``, in ``DIR/cifar-10-batches-py/`` or in ``DIR`` itself, or the archive
  ``cifar-10-python.tar.gz`` in ``DIR`` (unpacked on first use). The batches are pickles: load only
  the official files.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import tarfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MNIST_FILES = {  # name → md5 of the .gz file
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")

#: IDX type codes → big-endian numpy dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataNotFoundError(FileNotFoundError):
    """The data set is not on disk and could not be downloaded; the message says what to do."""


# ---------------------------------------------------------------------- downloads
def download(urls: Sequence[str], target: Path, md5: str | None = None, timeout: float = 10.0) -> str | None:
    """Fetch the first URL that answers into ``target`` (checked against ``md5``); return ``None``
    on success, else the reason of the last failure (the network may be closed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    reason = "no URL"
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, partial.open("wb") as out:
                digest = hashlib.md5()
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if md5 is not None and digest.hexdigest() != md5:
                reason = f"{url}: checksum {digest.hexdigest()} is not the expected {md5}"
                continue
            partial.replace(target)
            return None
        except OSError as error:  # URLError, timeouts, refused connections, DNS failures
            reason = f"{url}: {getattr(error, 'reason', error)}"
        finally:
            partial.unlink(missing_ok=True)
    return reason


# ---------------------------------------------------------------------- digits
def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 digits: pixels as float32 in [0, 1] of shape ``(1797, 64)``, labels long."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ImportError(
            "The digits example needs scikit-learn: pip install scikit-learn (or 'lightning-dsgd[examples]')."
        ) from None
    x, y = sklearn_digits(return_X_y=True)
    return torch.as_tensor(x / 16.0, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)


def digits_split(val_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x_train, y_train, x_val, y_val``: the digits split stratified by class, fixed by ``seed``."""
    x, y = load_digits()  # first: its message says how to install scikit-learn
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(np.arange(len(y)), test_size=val_fraction, stratify=y.numpy(), random_state=seed)
    train, val = torch.as_tensor(train), torch.as_tensor(val)
    return x[train], y[train], x[val], y[val]


# ---------------------------------------------------------------------- MNIST
def read_idx(path: str | Path) -> Tensor:
    """An IDX file (``.gz`` or raw) as a tensor of its own shape (uint8 stays uint8)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}).")
    dtype, ndim = np.dtype(_IDX_TYPES[data[2]]), data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=4 + 4 * ndim)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True).reshape(shape))


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def ensure_mnist(directory: str | Path, download_missing: bool = True) -> dict[str, Path]:
    """The paths of the four MNIST files in ``directory``, downloading the missing ones if allowed."""
    directory = Path(directory)
    found: dict[str, Path] = {}
    failure = "downloads are off (download=False)"
    for name, md5 in MNIST_FILES.items():
        path = _find(directory, name)
        if path is None and download_missing:
            reason = download([mirror + f"{name}.gz" for mirror in MNIST_MIRRORS], directory / f"{name}.gz", md5)
            path = _find(directory, name)
            failure = reason or failure
        if path is not None:
            found[name] = path
    missing = [name for name in MNIST_FILES if name not in found]
    if missing:
        raise DataNotFoundError(
            f"MNIST is not in {directory.resolve()} and could not be downloaded ({failure}). Put the files "
            f"{', '.join(f'{m}.gz' for m in missing)} (gzipped or not) from {MNIST_MIRRORS[0]} in that folder, "
            "or point data_dir (--data.init_args.data_dir) at a folder that holds them."
        )
    return found


def load_mnist(directory: str | Path, download_missing: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x_train, y_train, x_test, y_test``: images as float32 in [0, 1] of shape ``(n, 784)``."""
    files = ensure_mnist(directory, download_missing)

    def images(name: str) -> Tensor:
        x = read_idx(files[name])
        return x.reshape(x.shape[0], -1).float().div_(255.0)

    def labels(name: str) -> Tensor:
        return read_idx(files[name]).long()

    x_train, y_train = images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte")
    x_test, y_test = images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(f"MNIST in {directory}: image and label files disagree on the number of samples.")
    return x_train, y_train, x_test, y_test


# ---------------------------------------------------------------------- CIFAR-10
def _cifar_folder(directory: Path) -> Path | None:
    for folder in (directory / CIFAR10_FOLDER, directory):
        if all((folder / name).is_file() for name in CIFAR10_BATCHES):
            return folder
    return None


def ensure_cifar10(directory: str | Path, download_missing: bool = True) -> Path:
    """The folder holding the six CIFAR-10 batches (unpacking or downloading the archive if needed)."""
    directory = Path(directory)
    folder = _cifar_folder(directory)
    if folder is not None:
        return folder
    archive = directory / CIFAR10_ARCHIVE
    failure = "downloads are off (download=False)"
    if not archive.is_file() and download_missing:
        failure = download([CIFAR10_URL], archive, CIFAR10_MD5, timeout=30.0) or failure
    if archive.is_file():
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name in CIFAR10_BATCHES]
            for member in members:
                member.name = f"{CIFAR10_FOLDER}/{Path(member.name).name}"  # flat, no path tricks
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python ≥ 3.10.12
            tar.extractall(directory, members=members, **safe)
        folder = _cifar_folder(directory)
        if folder is not None:
            return folder
        failure = f"{archive} does not hold the six batches"
    raise DataNotFoundError(
        f"CIFAR-10 is not in {directory.resolve()} and could not be downloaded ({failure}). Put "
        f"{CIFAR10_ARCHIVE} (from {CIFAR10_URL}) in that folder, or its unpacked folder {CIFAR10_FOLDER}/ "
        f"with {', '.join(CIFAR10_BATCHES)}; or point data_dir (--data.init_args.data_dir) at it."
    )


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    with path.open("rb") as f:
        batch = pickle.load(f, encoding="bytes")  # the official python batches are pickles
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(data.copy()), torch.as_tensor(batch[b"labels"], dtype=torch.long)


def load_cifar10(directory: str | Path, download_missing: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x_train, y_train, x_test, y_test``: images as uint8 of shape ``(n, 3, 32, 32)``."""
    folder = ensure_cifar10(directory, download_missing)
    train = [_read_cifar_batch(folder / name) for name in CIFAR10_BATCHES[:-1]]
    x_test, y_test = _read_cifar_batch(folder / CIFAR10_BATCHES[-1])
    return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), x_test, y_test


# ---------------------------------------------------------------------- fakes for tests
def write_fake_mnist(
    directory: str | Path, n_train: int = 64, n_test: int = 32, gz: bool = True, seed: int = 0
) -> Path:
    """Tiny random IDX files with the real names and layout (for tests and offline trials)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def write(name: str, array: np.ndarray) -> None:
        header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
        payload = header + array.astype(np.uint8).tobytes()
        if gz:
            with gzip.open(directory / f"{name}.gz", "wb") as f:
                f.write(payload)
        else:
            (directory / name).write_bytes(payload)

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write(f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write(f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return directory


def write_fake_cifar10(directory: str | Path, n_per_batch: int = 16, seed: int = 0) -> Path:
    """Tiny random CIFAR-10 python batches in ``directory/cifar-10-batches-py``."""
    folder = Path(directory) / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in CIFAR10_BATCHES:
        batch = {
            b"data": rng.integers(0, 256, (n_per_batch, 3072)).astype(np.uint8),
            b"labels": rng.integers(0, 10, n_per_batch).tolist(),
        }
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)
    return Path(directory)
