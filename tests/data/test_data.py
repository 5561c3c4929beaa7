"""Datasets: folder (with classes), LSUN LMDB, synthetic; corrupt files; identity; errors."""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sagan_cli.config import DataConfig, recipe_from_dict
from sagan_cli.data.datasets import build_dataset, dataset_identity
from sagan_cli.errors import UserError

RED, BLUE = torch.tensor([250, 0, 0]) / 127.5 - 1, torch.tensor([0, 0, 250]) / 127.5 - 1


def mean_colour(image: torch.Tensor) -> torch.Tensor:
    return image.mean(dim=(1, 2))


def folder(path: Path, **kw) -> DataConfig:
    return DataConfig(kind="folder", path=str(path), **kw)


@pytest.mark.parametrize("resolution", [32, 64])
def test_folder_items_are_square_tensors_in_range(image_folder, resolution):
    ds = build_dataset(folder(image_folder), resolution)
    assert len(ds) == 4 and ds.class_names == [] and ds.skipped == 0
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1 and label == 0
    # sorted by relative path: cats/a.png, cats/more/b.png, dogs/c.jpg, dogs/d.JPEG
    assert torch.allclose(mean_colour(ds[1][0]), RED, atol=0.02)
    assert torch.allclose(mean_colour(ds[2][0]), BLUE, atol=0.05)


def test_folder_class_labels_come_from_sorted_subfolders(image_folder):
    ds = build_dataset(folder(image_folder), 32, num_classes=2)
    assert ds.class_names == ["cats", "dogs"]
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == [0, 0, 1, 1]
    assert torch.allclose(mean_colour(ds[3][0]), BLUE, atol=0.05)


def test_folder_class_count_mismatch_names_the_key(image_folder):
    with pytest.raises(UserError, match=r"model.num_classes is 3 .* 2 class sub-folders \(cats, dogs\)"):
        build_dataset(folder(image_folder), 32, num_classes=3)


def test_max_images_spreads_over_classes(image_folder):
    ds = build_dataset(folder(image_folder, max_images=2), 32, num_classes=2)
    assert len(ds) == 2 and [ds[0][1], ds[1][1]] == [0, 1]


def test_corrupt_file_is_skipped_counted_and_warned_once(image_folder, caplog):
    bad = image_folder / "cats" / "more" / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ds = build_dataset(folder(image_folder), 32, num_classes=2)
    assert len(ds) == 4 and ds.skipped == 0  # found lazily, not by decoding everything up front
    with caplog.at_level(logging.WARNING, logger="sagan_cli.data.datasets"):
        image, label = ds[1]
        assert label == 1 and ds.skipped == 1  # replaced by the next readable item (dogs/c.jpg)
        assert torch.allclose(mean_colour(image), BLUE, atol=0.05)
        ds[1]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "\n" not in warnings[0]


def test_skips_are_counted_across_dataloader_workers(image_folder):
    for name in ("c.jpg", "d.JPEG"):  # last in sorted order: construction decodes only cats/a.png
        (image_folder / "dogs" / name).write_bytes(b"garbage")
    ds = build_dataset(folder(image_folder), 32)
    assert ds.skipped == 0
    images = [x for x, _ in DataLoader(ds, batch_size=1, num_workers=2)]
    assert len(images) == 4 and ds.skipped == 2  # found in the workers, counted in this process
    assert torch.allclose(mean_colour(images[3][0]), RED, atol=0.02)  # d.JPEG -> wraps to cats/a.png


def test_no_readable_image_is_a_user_error(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "y.png").write_bytes(b"")
    with pytest.raises(UserError, match="no readable image"):
        build_dataset(folder(tmp_path), 32)
    (tmp_path / "x.jpg").unlink(), (tmp_path / "y.png").unlink()
    with pytest.raises(UserError, match="no images found"):
        build_dataset(folder(tmp_path), 32)


@pytest.mark.parametrize("kind", ["folder", "lsun"])
def test_missing_path_says_which_key_to_set(tmp_path, kind):
    with pytest.raises(UserError, match="data.path") as info:
        build_dataset(DataConfig(kind=kind, path=str(tmp_path / "nope")), 32)
    assert "nope" in str(info.value)
    if kind == "lsun":
        assert "download.py -c church_outdoor" in str(info.value)


def test_lsun_directory_without_lmdb(tmp_path):
    with pytest.raises(UserError, match="no data.mdb"):
        build_dataset(DataConfig(kind="lsun", path=str(tmp_path)), 32)


def encoded(colour: tuple[int, int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 36), colour).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def lsun_lmdb(tmp_path) -> Path:
    """An LMDB laid out like LSUN's: hex ids -> JPEG/WebP bytes; the third value is corrupt."""
    root = tmp_path / "church_outdoor_train_lmdb"
    values = [encoded((250, 0, 0), "JPEG"), encoded((0, 0, 250), "WEBP"), b"\xff\xd8 corrupt",
              encoded((0, 250, 0), "JPEG")]
    with lmdb.open(str(root), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(f"{i:040x}".encode(), value)
    return root


def test_lsun_reads_lmdb_lazily_without_writing_a_cache(lsun_lmdb, tmp_path, monkeypatch, caplog):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    ds = build_dataset(DataConfig(kind="lsun", path=str(lsun_lmdb)), 32)
    assert len(ds) == 4
    with caplog.at_level(logging.WARNING, logger="sagan_cli.data.datasets"):
        colours = [mean_colour(ds[i][0]) for i in range(4)]
    assert torch.allclose(colours[1], BLUE, atol=0.05)
    assert torch.allclose(colours[2], colours[3]) and colours[3][1] > 0.9  # corrupt -> next (green)
    assert ds.skipped == 1 and len(caplog.records) == 1 and f"{2:040x}" in caplog.records[0].getMessage()
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert torch.equal(clone[0][0], ds[0][0])
    batches = list(DataLoader(ds, batch_size=4, num_workers=1))  # a forked worker opens its own LMDB
    assert torch.equal(batches[0][0][1], ds[1][0])
    assert list(work.iterdir()) == []


def test_lsun_accepts_the_data_mdb_file_and_max_images(lsun_lmdb):
    ds = build_dataset(DataConfig(kind="lsun", path=str(lsun_lmdb / "data.mdb"), max_images=2), 32)
    assert len(ds) == 2


def synthetic(**kw) -> DataConfig:
    return DataConfig(**{"kind": "synthetic", "synthetic_size": 50, **kw})


@pytest.mark.parametrize("resolution", [32, 64])
def test_synthetic_is_mirror_symmetric_and_in_range(resolution):
    ds = build_dataset(synthetic(), resolution)
    assert len(ds) == 50
    for i in range(5):
        image, label = ds[i]
        assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32 and label == 0
        assert image.min() >= -1 and image.max() <= 1 and image.max() - image.min() > 1.5
        assert torch.equal(image, image.flip(-1)) and not torch.equal(image, image.flip(-2))


def test_synthetic_is_a_pure_function_of_seed_and_index():
    a, b = build_dataset(synthetic(), 32), build_dataset(synthetic(synthetic_size=10), 32)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(10))
    c = build_dataset(synthetic(synthetic_seed=1), 32)
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0], a[1][0])


def test_synthetic_classes_are_blob_colours():
    ds = build_dataset(synthetic(), 32, num_classes=3)
    assert len(ds.class_names) == 3
    items = [ds[i] for i in range(30)]
    assert {y for _, y in items} == {0, 1, 2}
    brightest = {y: tuple(x.flatten(1)[:, x.flatten(1).sum(0).argmax()].tolist()) for x, y in items}
    assert len(set(brightest.values())) == 3
    for x, y in items:  # the same class always has the same colour
        assert tuple(x.flatten(1)[:, x.flatten(1).sum(0).argmax()].tolist()) == brightest[y]


def test_synthetic_max_images_and_crowding():
    assert len(build_dataset(synthetic(max_images=7), 32)) == 7
    ds = build_dataset(synthetic(synthetic_blobs_per_side=3, synthetic_radius_min=0.05,
                                 synthetic_radius_max=0.1), 32)
    assert ds[0][0].shape == (3, 32, 32)
    with pytest.raises(UserError, match="data.synthetic_radius_max"):
        build_dataset(synthetic(synthetic_blobs_per_side=4, synthetic_radius_max=0.2), 32)


@pytest.mark.parametrize("key, value", [("synthetic_blobs_per_side", 0), ("synthetic_radius_min", 0.01),
                                        ("synthetic_radius_max", 0.3)])
def test_synthetic_keys_are_validated(key, value):
    with pytest.raises(UserError, match=f"data.{key}|data.synthetic_radius_min"):
        recipe_from_dict({"data": {key: value}})


def test_identity_is_stable_and_tracks_contents(image_folder, lsun_lmdb):
    cfg = folder(image_folder)
    first = dataset_identity(cfg, 32)
    assert first == dataset_identity(cfg, 32) and first != dataset_identity(cfg, 64)
    assert first != dataset_identity(folder(image_folder, max_images=2), 32)
    path = image_folder / "dogs" / "c.jpg"
    os.utime(path, ns=(1, 1))
    assert dataset_identity(cfg, 32) != first
    lsun = DataConfig(kind="lsun", path=str(lsun_lmdb))
    assert dataset_identity(lsun, 32) == dataset_identity(lsun, 32) != dataset_identity(lsun, 64)
    ids = {dataset_identity(synthetic(**kw), 32) for kw in
           ({}, {"synthetic_seed": 1}, {"synthetic_blobs_per_side": 2}, {"synthetic_radius_max": 0.15})}
    assert len(ids) == 4 and dataset_identity(synthetic(), 32) in ids
    assert dataset_identity(synthetic(), 32, num_classes=3) not in ids
    assert np.all([len(i) < 40 for i in ids])
