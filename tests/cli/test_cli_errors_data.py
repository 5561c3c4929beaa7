"""`sagan train` on bad IDX / CIFAR-10 binary data or a recipe that does not fit it: exit code 2, one
`error:` line naming the culprit, no traceback, and no run directory left behind."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from conftest import IdxSet, idx_bytes, tiny_garments, write_idx
from helpers import assert_one_error_line, run_main

RECIPE = """\
[data]
kind = "{kind}"
path = "{path}"
[model]
resolution = 32
num_classes = {classes}
g_ch = 16
d_ch = 16
z_dim = 16
g_attention = [16]
d_attention = [8]
[train]
steps = 1
batch_size = 4
sample_grid = 4
ema = false
"""


def train(tmp_path: Path, kind: str, path: Path, classes: int, *sets: str, monkeypatch, capsys) -> tuple[int, str, str]:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(kind=kind, path=path, classes=classes))
    args = ["train", str(recipe), "--out", str(tmp_path / "run")]
    for s in sets:
        args += ["--set", s]
    return run_main(args, capsys, monkeypatch)


def damage(root: Path, how: str) -> None:
    images, labels = tiny_garments(12)
    path = root / "train-images-idx3-ubyte.gz"
    if how == "magic":
        path.write_bytes(gzip.compress(b"GIF8" + idx_bytes(images)[4:]))
    elif how == "truncated":
        path.write_bytes(gzip.compress(idx_bytes(images)[:500]))
    elif how == "count":
        write_idx(root / "train-labels-idx1-ubyte.gz", labels[:11])
    elif how == "empty-folder":
        for f in list(root.iterdir()):
            f.unlink()


IDX_CASES = {
    # id: (damage, num_classes, --set overrides, what the line must name)
    "missing-folder": (None, 3, ["data.path=/nonexistent/fashion"], ["/nonexistent/fashion", "does not exist"]),
    "no-idx-files": ("empty-folder", 3, [], ["no IDX train images", "dataset-fashion-mnist"]),
    "wrong-magic": ("magic", 3, [], ["train-images-idx3-ubyte.gz", "not an IDX file"]),
    "truncated": ("truncated", 3, [], ["train-images-idx3-ubyte.gz", "truncated"]),
    "count-mismatch": ("count", 3, [], ["12 images", "11 labels"]),
    "classes": (None, 10, [], ["model.num_classes is 10", "labels 0-2"]),
    "channels": (None, 3, ["model.channels=3"], ["model.channels is 3", "1-channel"]),
    "split": (None, 3, ["data.split=validation"], ["data.split", "train, test"]),
    "kind": (None, 3, ["data.kind=mnist"], ["data.kind", "idx", "cifar10-bin"]),
}


@pytest.mark.parametrize("case", IDX_CASES, ids=list(IDX_CASES))
def test_bad_idx_data(case: str, idx_folder: IdxSet, tmp_path: Path, monkeypatch, capsys) -> None:
    how, classes, sets, names = IDX_CASES[case]
    if how:
        damage(idx_folder.root, how)
    before = sorted(p.name for p in idx_folder.root.iterdir())
    code, out, err = train(tmp_path, "idx", idx_folder.root, classes, *sets, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_error_line(code, out, err, list(names))
    assert not (tmp_path / "run" / "config.json").exists()
    assert sorted(p.name for p in idx_folder.root.iterdir()) == before  # nothing written beside the data


def test_good_idx_data_trains(idx_folder: IdxSet, tmp_path: Path, monkeypatch, capsys) -> None:
    """The same command on undamaged files succeeds: the cases above fail for their damage alone."""
    code, out, err = train(tmp_path, "idx", idx_folder.root, 3, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "g.safetensors").is_file()


@pytest.mark.parametrize("how, names", [
    ("truncated", ["data_batch_3.bin", "truncated"]),
    ("missing", ["lacks test_batch.bin"]),
    ("grayscale", ["model.channels is 1", "3-channel"]),
])
def test_bad_cifar10_data(how: str, names: list[str], cifar_folder: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    sets = []
    if how == "truncated":
        (cifar_folder / "data_batch_3.bin").write_bytes(b"\x03" * 5000)
    elif how == "missing":
        (cifar_folder / "test_batch.bin").unlink()
        sets = ["data.split=test"]
    else:
        sets = ["model.channels=1"]
    code, out, err = train(tmp_path, "cifar10-bin", cifar_folder, 10, *sets, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_error_line(code, out, err, list(names))
    assert not (tmp_path / "run" / "config.json").exists()
