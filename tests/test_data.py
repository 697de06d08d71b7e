"""Dataset loading: the bundled digits, and tiny files in each published format written here byte by byte."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from rmi_fast.robust.data import DATASETS, Split, load_dataset, read_idx
from rmi_fast.robust.matfile import read_numeric_arrays

# ----------------------------------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_classes():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert isinstance(train, Split) and (train.name, train.split, test.split) == ("digits", "train", "test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    for s in (train, test):
        assert s.images.dtype == torch.float32 and s.labels.dtype == torch.int64
        assert s.images.min() == 0 and s.images.max() == 1
        assert torch.equal(s.images * 16, (s.images * 16).round())  # the 17 grey levels, exactly
        counts = torch.bincount(s.labels, minlength=10)
        assert counts.shape == (10,) and counts.min() > 0
    # stratified 80/20: every class has 20% ± one sample in the test split
    total = torch.bincount(torch.cat([train.labels, test.labels]))
    assert (torch.bincount(test.labels) - 0.2 * total).abs().max() <= 1


def test_digits_split_is_deterministic_and_partitions_the_data():
    from sklearn.datasets import load_digits

    a, b = load_dataset("digits", "test"), load_dataset("digits", "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    train = load_dataset("digits", "train")
    ours = np.concatenate([train.images.reshape(-1, 64).numpy() * 16, a.images.reshape(-1, 64).numpy() * 16])
    ours = np.concatenate([ours, np.concatenate([train.labels, a.labels])[:, None]], 1)
    full = load_digits()
    theirs = np.concatenate([full.data, full.target[:, None]], 1)
    assert np.array_equal(ours[np.lexsort(ours.T)], theirs[np.lexsort(theirs.T)])


def test_split_is_a_dataset_and_limit_keeps_the_first_samples():
    full, few = load_dataset("digits", "train"), load_dataset("digits", "train", limit=10)
    assert len(few) == 10 and torch.equal(few.images, full.images[:10]) and torch.equal(few.labels, full.labels[:10])
    image, label = few[3]
    assert image.shape == (1, 8, 8) and label.dim() == 0
    assert few.tensors[0] is few.images and few.info is DATASETS["digits"]
    images, labels = next(iter(torch.utils.data.DataLoader(few, batch_size=4)))
    assert images.shape == (4, 1, 8, 8) and torch.equal(labels, few.labels[:4])


def test_dataset_settings():
    assert DATASETS["cifar10"].eps == pytest.approx(8 / 255) and DATASETS["cifar10"].steps == 7
    assert (DATASETS["mnist"].eps, DATASETS["mnist"].alpha, DATASETS["mnist"].steps) == (0.3, 0.1, 10)
    assert (DATASETS["fashion-mnist"].eps, DATASETS["fashion-mnist"].alpha) == (0.1, 0.02)
    assert (DATASETS["svhn"].eps, DATASETS["svhn"].alpha) == (4 / 255, 0.005)
    for info in DATASETS.values():
        assert info.batch_size == 128 and info.num_classes == 10
        assert 0 < info.alpha <= info.eps < 1 and info.alpha * info.steps >= info.eps


# ----------------------------------------------------------------------------------------------------- writers

def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _write_idx_set(folder, rng, n_train=5, n_test=3, gz=False, size=28):
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        _write(folder / f"{prefix}-images-idx3-ubyte{suffix}", _idx_bytes(images))
        _write(folder / f"{prefix}-labels-idx1-ubyte{suffix}", _idx_bytes(labels))
        arrays["train" if prefix == "train" else "test"] = images, labels
    return arrays


def _assert_round_trip(split: Split, images_chw: np.ndarray, labels: np.ndarray):
    assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
    assert split.images.min() >= 0 and split.images.max() <= 1
    assert np.array_equal((split.images * 255).round().numpy().astype(np.uint8), images_chw)
    assert np.array_equal(split.labels.numpy(), labels)


# ----------------------------------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("name, subdir, gz", [("mnist", "", False), ("mnist", "mnist", True),
                                              ("fashion-mnist", "FashionMNIST/raw", True)])
def test_idx_round_trip(tmp_path, name, subdir, gz):
    arrays = _write_idx_set(tmp_path / subdir, np.random.default_rng(0), gz=gz)
    for split in ("train", "test"):
        loaded = load_dataset(name, split, data_dir=tmp_path)
        images, labels = arrays[split]
        assert loaded.images.shape == (len(images), 1, 28, 28)
        _assert_round_trip(loaded, images[:, None], labels)
    assert len(load_dataset(name, "train", data_dir=str(tmp_path), limit=2)) == 2


def test_read_idx_other_types_and_byte_order(tmp_path):
    values = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    _write(tmp_path / "a.idx", _idx_bytes(values, 0x0C))
    out = read_idx(tmp_path / "a.idx")
    assert out.shape == (3, 4) and np.array_equal(out, values) and out.dtype.isnative


def _bad_idx_case(tmp_path, kind):
    arrays = _write_idx_set(tmp_path, np.random.default_rng(1))
    images, labels = arrays["train"]
    target = tmp_path / "train-images-idx3-ubyte"
    if kind == "magic":
        target.write_bytes(b"\x08\x03\x00\x00" + target.read_bytes()[4:])
    elif kind == "truncated":
        target.write_bytes(target.read_bytes()[:-7])
    elif kind == "trailing":
        target.write_bytes(target.read_bytes() + b"\x00")
    elif kind == "header":
        target.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    elif kind == "shape":
        target.write_bytes(_idx_bytes(images[:, :27, :27].copy()))
    elif kind == "dtype":
        target.write_bytes(_idx_bytes(images.astype(">i4"), 0x0C))
    elif kind == "count":
        target = tmp_path / "train-labels-idx1-ubyte"
        target.write_bytes(_idx_bytes(labels[:-1].copy()))
    elif kind == "label":
        target = tmp_path / "train-labels-idx1-ubyte"
        target.write_bytes(_idx_bytes(np.where(np.arange(len(labels)) == 2, 10, labels).astype(np.uint8)))
    elif kind == "gzip":
        target.unlink()
        target = tmp_path / "train-images-idx3-ubyte.gz"
        target.write_bytes(b"\x1f\x8b\x08 not really gzip")
    return target


@pytest.mark.parametrize("kind, words", [("magic", "not an IDX file"), ("truncated", "truncated"),
                                         ("trailing", "trailing data"), ("header", "truncated IDX header"),
                                         ("shape", "(N, 28, 28)"), ("dtype", "uint8 images"),
                                         ("count", "expected 5 labels"), ("label", "labels must lie in [0, 10)"),
                                         ("gzip", "cannot be read as gzip")])
def test_malformed_idx_names_the_file(tmp_path, kind, words):
    target = _bad_idx_case(tmp_path, kind)
    with pytest.raises(ValueError) as info:
        load_dataset("mnist", "train", data_dir=tmp_path)
    assert str(target) in str(info.value) and words in str(info.value)


# ----------------------------------------------------------------------------------------------------- CIFAR-10

def _write_cifar(folder, rng, n=2, str_keys=False, protocol=pickle.DEFAULT_PROTOCOL):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, names in (("train", DATASETS["cifar10"].train_files), ("test", DATASETS["cifar10"].test_files)):
        data, labels = [], []
        for fname in names:
            batch_data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            batch_labels = [int(v) for v in rng.integers(0, 10, n)]
            key = (lambda k: k) if str_keys else (lambda k: k.encode())
            with open(folder / fname, "wb") as f:
                pickle.dump({key("batch_label"): key(fname), key("data"): batch_data, key("labels"): batch_labels}, f,
                            protocol=protocol)
            data.append(batch_data)
            labels += batch_labels
        arrays[split] = np.concatenate(data), np.array(labels)
    return arrays


@pytest.mark.parametrize("subdir, str_keys, protocol", [("cifar-10-batches-py", False, 2),
                                                      ("cifar-10-batches-py", False, 5), ("", True, 4)])
def test_cifar_round_trip(tmp_path, subdir, str_keys, protocol):
    arrays = _write_cifar(tmp_path / subdir if subdir else tmp_path, np.random.default_rng(2), str_keys=str_keys,
                          protocol=protocol)
    for split, n in (("train", 10), ("test", 2)):
        loaded = load_dataset("cifar10", split, data_dir=tmp_path)
        data, labels = arrays[split]
        assert loaded.images.shape == (n, 3, 32, 32)
        # published layout: each row is the 1024 red, then green, then blue values of a row-major 32×32 image
        n_, c, i, j = 1, 2, 5, 17
        assert loaded.images[n_, c, i, j] * 255 == pytest.approx(float(data[n_, c * 1024 + i * 32 + j]))
        _assert_round_trip(loaded, data.reshape(n, 3, 32, 32), labels)


def test_cifar_limit_reads_only_the_batches_it_needs(tmp_path):
    data, labels = _write_cifar(tmp_path, np.random.default_rng(5), n=3)["train"]
    (tmp_path / "data_batch_3").write_bytes(b"damaged")  # a limit within the first two batches never opens it
    for limit in (2, 3, 4, 6):  # within the first batch, all of it, across into the second, both whole
        _assert_round_trip(load_dataset("cifar10", "train", data_dir=tmp_path, limit=limit),
                           data[:limit].reshape(limit, 3, 32, 32), labels[:limit])
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", "train", data_dir=tmp_path, limit=7)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _crafted_batch(data: bytes, labels: bytes = b"](K\x01K\x02e") -> bytes:
    """A protocol-2 pickle of {"data": <data>, "labels": <labels>}, the two values given as raw opcodes."""
    return b"\x80\x02}(X\x04\x00\x00\x00data" + data + b"X\x06\x00\x00\x00labels" + labels + b"u."


_EMPTY_ARRAY = b"cnumpy\nndarray\n(K\x02M\x00\x0c\x86X\x02\x00\x00\x00u1tR"  # numpy.ndarray((2, 3072), "u1")


@pytest.mark.parametrize("payload, words", [
    (b"definitely not a pickle", "not a CIFAR-10 python batch"),
    # globals called with arguments of the file's choosing: uninitialised memory, a huge buffer, an unknown codec
    (_crafted_batch(_EMPTY_ARRAY), "numpy.ndarray called directly"),
    (_crafted_batch(b"](K\x01e", b"c__builtin__\nbytes\n(\x8a\x06\x00\xa0rN\x18\x09tR"), "bytes(...) with arguments"),
    (_crafted_batch(b"c_codecs\nencode\n(X\x03\x00\x00\x00abcX\x06\x00\x00\x00latjn1tR"), "LookupError"),
    (b"\x80\x05\x95" + struct.pack("<Q", 2**63) + b"}.", "OverflowError"),  # a frame longer than any file
    (pickle.dumps([1, 2, 3]), "expected a dict"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "expected keys b'data' and b'labels'"),
    (pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}), "shape (N, 3072)"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8 array"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "expected 2 labels"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}), "labels must lie in [0, 10)"),
    (pickle.dumps({b"data": _Evil(), b"labels": [0]}), "is not allowed"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": None}), "b'labels' must be a list of integers"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1.7, 2.9]}), "got float64 values"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [2**70, 1]}), "got object values"),
])
def test_malformed_cifar_names_the_file(tmp_path, payload, words, capsys):
    _write_cifar(tmp_path, np.random.default_rng(3))
    (tmp_path / "data_batch_3").write_bytes(payload)
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert str(tmp_path / "data_batch_3") in str(info.value) and words in str(info.value)
    assert "pwned" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------- SVHN

def _write_svhn(folder, rng, n=4, labels=None):
    import scipy.io

    folder.mkdir(parents=True, exist_ok=True)
    X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array(labels if labels is not None else [10, 1, 5, 9][:n], dtype=np.uint8).reshape(n, 1)
    for fname in ("train_32x32.mat", "test_32x32.mat"):
        scipy.io.savemat(folder / fname, {"X": X, "y": y})
    return X, y


@pytest.mark.parametrize("subdir", ["", "svhn"])
def test_svhn_round_trip(tmp_path, subdir):
    X, y = _write_svhn(tmp_path / subdir if subdir else tmp_path, np.random.default_rng(4))
    for split in ("train", "test"):
        loaded = load_dataset("svhn", split, data_dir=tmp_path)
        assert loaded.images.shape == (4, 3, 32, 32)
        assert loaded.images[2, 1, 7, 30] * 255 == pytest.approx(float(X[7, 30, 1, 2]))  # X[row, col, channel, n]
        _assert_round_trip(loaded, X.transpose(3, 2, 0, 1), np.array([0, 1, 5, 9]))  # 10 is the digit 0
    _assert_round_trip(load_dataset("svhn", "train", data_dir=tmp_path, limit=3), X.transpose(3, 2, 0, 1)[:3],
                       np.array([0, 1, 5]))


def test_malformed_svhn_names_the_file(tmp_path):
    import scipy.io

    target = tmp_path / "train_32x32.mat"
    cases = [
        (lambda: target.write_bytes(b"MATLAB? no"), "not a MATLAB 5/7 MAT-file"),
        (lambda: scipy.io.savemat(target, {"X": np.zeros((32, 32, 3, 2), np.uint8)}),
         "expected numeric variables 'X' and 'y'"),
        (lambda: scipy.io.savemat(target, {"X": np.zeros((32, 32, 1, 2), np.uint8), "y": np.ones((2, 1))}),
         "'X' must be uint8 of shape (32, 32, 3, N)"),
        (lambda: scipy.io.savemat(target, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))}),
         "'y' must have shape (2, 1)"),
        (lambda: _write_svhn(tmp_path, np.random.default_rng(5), n=2, labels=[0, 3]), "integers in 1..10"),
        (lambda: _write_svhn(tmp_path, np.random.default_rng(5), n=2, labels=[11, 3]), "integers in 1..10"),
        (lambda: scipy.io.savemat(target, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1)) * (1 + 1j)}),
         "expected numeric variables 'X' and 'y', found ['X']"),
    ]
    for write, words in cases:
        write()
        with pytest.raises(ValueError) as info:
            load_dataset("svhn", "train", data_dir=tmp_path)
        assert str(target) in str(info.value) and words in str(info.value), words


# ----------------------------------------------------------------------------------------------------- MAT-files

def _mat_variables(rng):
    return {"X": rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8), "y": np.array([[10], [1], [5], [9], [3]]),
            "f32": rng.standard_normal((3, 5)).astype(np.float32), "i16": np.arange(-3, 3, dtype=np.int16),
            "one": np.array(7.0), "empty": np.zeros((0, 3)), "text": "skipped", "cplx": np.array([1 + 2j]),
            "cell": np.array([np.zeros(2), "a"], dtype=object)}


@pytest.mark.parametrize("compressed", [False, True])
def test_mat_reader_matches_scipy(tmp_path, compressed):
    """Every real numeric variable as scipy.io.loadmat reads it (values, dtype, shape); the rest is skipped."""
    import scipy.io

    path = tmp_path / "v.mat"
    scipy.io.savemat(path, _mat_variables(np.random.default_rng(9)), do_compression=compressed)
    ours, ref = read_numeric_arrays(path), scipy.io.loadmat(path)
    assert sorted(ours) == ["X", "empty", "f32", "i16", "one", "y"]
    for name, array in ours.items():
        assert array.dtype == ref[name].dtype and array.shape == ref[name].shape, name
        assert np.array_equal(array, ref[name]), name


def _element(order, kind, data: bytes) -> bytes:
    pad = b"\0" * (-len(data) % 8)
    return struct.pack(order + "II", kind, len(data)) + data + pad


def test_mat_reader_big_endian_small_elements_and_narrow_storage(tmp_path):
    """A file written by hand: big-endian, the name in a small (4-byte) element, a double array stored as uint8."""
    order = ">"
    values = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)  # (2, 3), stored column-major
    body = (_element(order, 6, struct.pack(order + "II", 6, 0))  # flags: class 6 = double
            + _element(order, 5, struct.pack(order + "ii", 2, 3))  # dimensions
            + struct.pack(order + "HH", 1, 1) + b"y\0\0\0"  # name "y" as a small int8 element: (count << 16) | type
            + _element(order, 2, values.tobytes(order="F")))  # data as uint8
    header = b"MATLAB 5.0 MAT-file, written by hand".ljust(124, b" ") + struct.pack(order + "H", 0x0100) + b"MI"
    (tmp_path / "be.mat").write_bytes(header + _element(order, 14, body))
    y = read_numeric_arrays(tmp_path / "be.mat")["y"]
    assert y.dtype == np.float64 and np.array_equal(y, values.astype(np.float64))


def test_mat_reader_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "v73.mat").write_bytes(b"MATLAB 7.3 MAT-file".ljust(124, b" ") + b"\0\2IM" + b"\0" * 64)
    with pytest.raises(ValueError, match="v7.3 files are HDF5: save with -v7"):
        read_numeric_arrays(tmp_path / "v73.mat")


@pytest.mark.parametrize("compressed", [False, True])
def test_mat_reader_damaged_files_raise_value_error(tmp_path, compressed):
    """Flipped bytes, overwritten words and truncations of a valid file: each read either succeeds or raises a
    ValueError naming the file, never another error (scipy's own reader can crash the process on some of these)."""
    import scipy.io

    good_path = tmp_path / "good.mat"
    scipy.io.savemat(good_path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[10], [1]])},
                     do_compression=compressed)
    good = good_path.read_bytes()
    rng = np.random.default_rng(10)
    path = tmp_path / "bad.mat"
    failed = 0
    for trial in range(600):
        damaged = bytearray(good)
        if trial % 3 == 0:
            for i in rng.integers(0, len(damaged), rng.integers(1, 4)):
                damaged[i] = rng.integers(0, 256)
        elif trial % 3 == 1:
            i = rng.integers(128, len(damaged) - 4)
            damaged[i:i + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        else:
            damaged = damaged[:rng.integers(0, len(damaged))]
        path.write_bytes(bytes(damaged))
        try:
            read_numeric_arrays(path)
        except ValueError as exc:
            assert str(path) in str(exc)
            failed += 1
    assert failed > 100  # the damage was noticed, not ignored


# ----------------------------------------------------------------------------------------------------- missing data

@pytest.mark.parametrize("name, expected", [("mnist", "train-images-idx3-ubyte"), ("fashion-mnist", "train-images"),
                                            ("cifar10", "data_batch_1"), ("svhn", "train_32x32.mat")])
def test_missing_files_say_what_is_expected(tmp_path, name, expected):
    with pytest.raises(ValueError, match="data_dir is required") as info:
        load_dataset(name)
    assert expected in str(info.value) and "nothing is downloaded" in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, data_dir=tmp_path)
    message = str(info.value)
    assert expected in message and str(tmp_path) in message and "nothing is downloaded" in message
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_dataset(name, data_dir=tmp_path / "absent")


def test_one_missing_file_is_named(tmp_path):
    _write_cifar(tmp_path, np.random.default_rng(6))
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="'data_batch_4'"):
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert len(load_dataset("cifar10", "test", data_dir=tmp_path)) == 2  # the test split is complete


def test_files_spread_over_folders_are_named(tmp_path):
    """Each file is somewhere, but no one folder holds them all."""
    _write_idx_set(tmp_path, np.random.default_rng(7))
    (tmp_path / "mnist").mkdir()
    (tmp_path / "train-labels-idx1-ubyte").rename(tmp_path / "mnist" / "train-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="spread over .* they must all be in one of these folders"):
        load_dataset("mnist", "train", data_dir=tmp_path)


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_split_without_images_is_refused(tmp_path, protocol):
    _write_cifar(tmp_path, np.random.default_rng(8), n=0, protocol=protocol)  # protocol 2 pickles b"" as bytes()
    with pytest.raises(ValueError, match="test split: its files in .* hold no images"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


@pytest.mark.parametrize("kwargs, words", [(dict(name="imagenet"), "name must be one of"),
                                           (dict(name="digits", split="val"), "split must be one of"),
                                           (dict(name="digits", limit=0), "limit must be a positive integer"),
                                           (dict(name="digits", limit=2.5), "limit must be a positive integer")])
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        load_dataset(**kwargs)


_IMAGES, _LABELS = torch.rand(3, 1, 8, 8), torch.tensor([0, 9, 4])


@pytest.mark.parametrize("kwargs, words", [
    (dict(name="imagenet"), "name must be one of"),
    (dict(split="val"), "split must be one of"),
    (dict(images=torch.rand(3, 3, 8, 8)), "images must be a float32 (N, 1, 8, 8) tensor for digits"),
    (dict(images=_IMAGES * 2), "images must lie in [0, 1]"),
    (dict(labels=torch.tensor([0, 10, 4])), "labels must lie in [0, 10)"),
    (dict(labels=_LABELS.int()), "labels must be an int64 (3,) tensor"),
])
def test_a_split_is_what_its_dataset_holds(kwargs, words):
    """Split is the Dataset the paper's system trains on: its images and labels are checked against the dataset
    it names (its .info), as load_dataset would give them."""
    with pytest.raises(ValueError) as info:
        Split(**{"images": _IMAGES, "labels": _LABELS, "name": "digits", "split": "train", **kwargs})
    assert words in str(info.value)
