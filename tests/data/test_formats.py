"""Datasets read as distributed: MNIST-family IDX files (gzipped or not) and CIFAR-10's binary batches."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR_NAMES, IdxSet, cifar_records, idx_bytes, tiny_garments, write_idx
from PIL import Image

from sagan_cli.config import DataConfig
from sagan_cli.data.datasets import build_dataset, dataset_identity, image_to_tensor
from sagan_cli.errors import UserError


def idx(root: Path | str, **changes) -> DataConfig:
    return DataConfig(kind="idx", path=str(root), **changes)


def test_gzipped_train_split_matches_the_png_path(idx_folder: IdxSet) -> None:
    ds = build_dataset(idx(idx_folder.root), 32, num_classes=3)
    images, labels = idx_folder.train
    assert len(ds) == 12 and ds.channels == 1 and ds.skipped == 0
    for i in (0, 5, 11):
        x, y = ds[i]
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y == labels[i]
        # the same resize as a PNG of the same pixels read through a folder dataset, to the bit
        assert torch.equal(x, image_to_tensor(Image.fromarray(images[i]), 32, channels=1))
    same_size = build_dataset(idx(idx_folder.root), 32)  # at 28 -> 28 nothing is resampled
    assert same_size.images.shape == (12, 1, 28, 28) and torch.equal(same_size.images[3, 0], torch.from_numpy(images[3]))


def test_test_split_reads_the_plain_t10k_files(idx_folder: IdxSet) -> None:
    ds = build_dataset(idx(idx_folder.root, split="test"), 32, num_classes=3)
    assert len(ds) == 6
    assert torch.equal(ds.images[:, 0], torch.from_numpy(idx_folder.test[0]))
    assert [ds[i][1] for i in range(6)] == idx_folder.test[1].tolist()


def test_plain_and_gzipped_files_give_the_same_dataset(idx_folder: IdxSet, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (plain / name).write_bytes(gzip.decompress((idx_folder.root / f"{name}.gz").read_bytes()))
    a, b = build_dataset(idx(idx_folder.root), 32, 3), build_dataset(idx(plain), 32, 3)
    assert torch.equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert dataset_identity(idx(idx_folder.root), 32) != dataset_identity(idx(plain), 32)  # other bytes on disk


def test_unconditional_needs_no_labels_and_max_images_spreads(idx_folder: IdxSet) -> None:
    (idx_folder.root / "train-labels-idx1-ubyte.gz").unlink()
    ds = build_dataset(idx(idx_folder.root, max_images=4), 32)
    assert len(ds) == 4 and [ds[i][1] for i in range(4)] == [0, 0, 0, 0]
    assert torch.equal(ds.images[1, 0], torch.from_numpy(idx_folder.train[0][3]))  # every third image
    with pytest.raises(UserError, match="no labels file train-labels-idx1-ubyte"):
        build_dataset(idx(idx_folder.root), 32, num_classes=3)


def test_num_classes_must_match_the_labels(idx_folder: IdxSet) -> None:
    with pytest.raises(UserError, match=r"model.num_classes is 10 .* labels 0-2 \(3 classes\).*num_classes = 3"):
        build_dataset(idx(idx_folder.root), 32, num_classes=10)


def test_emnist_file_path_is_transposed_upright(tmp_path: Path) -> None:
    images, labels = tiny_garments(4)
    root = tmp_path / "emnist"
    write_idx(root / "emnist-letters-train-images-idx3-ubyte.gz", images.transpose(0, 2, 1))  # as EMNIST stores them
    write_idx(root / "emnist-letters-train-labels-idx1-ubyte.gz", labels)
    write_idx(root / "emnist-digits-train-images-idx3-ubyte.gz", images.transpose(0, 2, 1))
    with pytest.raises(UserError, match="several IDX train image files .*emnist-digits.*emnist-letters"):
        build_dataset(idx(root), 32)
    ds = build_dataset(idx(root / "emnist-letters-train-images-idx3-ubyte.gz"), 32, num_classes=3)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images)) and ds[2][1] == 2


def test_cached_decode_sees_a_rewritten_file(idx_folder: IdxSet) -> None:
    first = build_dataset(idx(idx_folder.root), 32)
    images, labels = tiny_garments(5, seed=7)
    write_idx(idx_folder.root / "train-images-idx3-ubyte.gz", images)
    write_idx(idx_folder.root / "train-labels-idx1-ubyte.gz", labels)
    assert len(first) == 12 and len(build_dataset(idx(idx_folder.root), 32)) == 5


def corrupt(root: Path, how: str) -> str:
    """Damage the train images (or labels) in one way; return what the error must say."""
    images_path = root / "train-images-idx3-ubyte.gz"
    images, labels = tiny_garments(12)
    if how == "magic":
        images_path.write_bytes(gzip.compress(b"\x89PNG" + idx_bytes(images)[4:]))
        return "not an IDX file"
    if how == "type":
        images_path.write_bytes(gzip.compress(idx_bytes(images, type_byte=0x0D)))
        return "IDX type 0x0d"
    if how == "swapped":
        shutil.copy(root / "train-labels-idx1-ubyte.gz", images_path)
        return "has 1 dimensions, expected 3"
    if how == "truncated":
        images_path.write_bytes(gzip.compress(idx_bytes(images)[:-100]))
        return "truncated or damaged: its header says 12 x 28 x 28"
    if how == "short-header":
        images_path.write_bytes(gzip.compress(idx_bytes(images)[:9]))
        return "header is incomplete"
    if how == "bad-gzip":
        images_path.write_bytes(images_path.read_bytes()[:200])
        return "cannot read"
    if how == "count":
        write_idx(root / "train-labels-idx1-ubyte.gz", labels[:10])
        return "holds 12 images but .* holds 10 labels"
    if how == "missing":
        images_path.unlink()
        return "no IDX train images"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["magic", "type", "swapped", "truncated", "short-header", "bad-gzip", "count", "missing"])
def test_damaged_files_are_user_errors(idx_folder: IdxSet, how: str) -> None:
    message = corrupt(idx_folder.root, how)
    with pytest.raises(UserError, match=message):
        build_dataset(idx(idx_folder.root), 32, num_classes=3)


def test_identity_is_the_content_and_the_split(idx_folder: IdxSet, tmp_path: Path) -> None:
    copy = shutil.copytree(idx_folder.root, tmp_path / "elsewhere")
    ids = {dataset_identity(idx(r), 32) for r in (idx_folder.root, copy)}
    assert len(ids) == 1  # the same files anywhere: the same reference statistics
    assert dataset_identity(idx(copy, split="test"), 32) not in ids
    assert dataset_identity(idx(copy), 64) not in ids
    raw = bytearray((copy / "t10k-images-idx3-ubyte").read_bytes())
    raw[-1] ^= 0xFF
    before = dataset_identity(idx(copy, split="test"), 32)
    (copy / "t10k-images-idx3-ubyte").write_bytes(bytes(raw))
    assert dataset_identity(idx(copy, split="test"), 32) != before


def test_idx_is_grayscale_only(idx_folder: IdxSet) -> None:
    with pytest.raises(UserError, match="model.channels is 3 .* 1-channel"):
        build_dataset(idx(idx_folder.root), 32, channels=3)


def test_folder_images_read_as_grayscale(image_folder: Path) -> None:
    ds = build_dataset(DataConfig(kind="folder", path=str(image_folder)), 32, num_classes=2, channels=1)
    x, label = ds[0]  # cats/a.png, pure red (250, 0, 0): Pillow's luma is 0.299 * 250
    assert x.shape == (1, 32, 32) and label == 0
    assert torch.allclose((x + 1) * 127.5, torch.full_like(x, round(0.299 * 250)), atol=0.5)


def cifar(root: Path, **changes) -> DataConfig:
    return DataConfig(kind="cifar10-bin", path=str(root), **changes)


def test_cifar10_binary_planes_labels_and_names(cifar_folder: Path) -> None:
    ds = build_dataset(cifar(cifar_folder.parent), 32, num_classes=10)  # the folder above is accepted too
    assert len(ds) == 10 and ds.channels == 3 and ds.class_names == CIFAR_NAMES
    assert [ds[i][1] for i in range(10)] == list(range(10))
    x, _ = ds[5]  # data_batch_3's second record: red 200, green 10, blue 20 * 5
    assert ((x[:, 7, 9] + 1) * 127.5).round().tolist() == [200, 10, 100]
    test = build_dataset(cifar(cifar_folder, split="test"), 64, num_classes=10)
    assert len(test) == 3 and test[0][0].shape == (3, 64, 64) and [test[i][1] for i in range(3)] == [9, 0, 4]
    assert dataset_identity(cifar(cifar_folder), 32) != dataset_identity(cifar(cifar_folder, split="test"), 32)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "data_batch_2.bin is truncated or not a CIFAR-10 binary batch"),
    ("label", "has label 12, but CIFAR-10 has labels 0-9"),
    ("missing", "lacks data_batch_4.bin"),
])
def test_cifar10_damage_is_a_user_error(cifar_folder: Path, damage: str, message: str) -> None:
    if damage == "truncate":
        path = cifar_folder / "data_batch_2.bin"
        path.write_bytes(path.read_bytes()[:-1])
    elif damage == "label":
        (cifar_folder / "data_batch_1.bin").write_bytes(cifar_records([12, 3]))
    else:
        (cifar_folder / "data_batch_4.bin").unlink()
    with pytest.raises(UserError, match=message):
        build_dataset(cifar(cifar_folder), 32, num_classes=10)
    with pytest.raises(UserError, match="model.channels is 1"):
        build_dataset(cifar(cifar_folder), 32, channels=1)
