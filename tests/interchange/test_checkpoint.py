"""safetensors checkpoints: round trip, metadata, refusals, atomic writes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sagan_cli.config import ModelConfig
from sagan_cli.errors import UserError
from sagan_cli.interchange.checkpoint import atomic_write, load_model, read_info, save_model
from sagan_cli.model.models import build_models

CFG = ModelConfig(arch="resnet", resolution=32, num_classes=3, z_dim=16, g_ch=8, d_ch=8,
                  attention="paper", g_attention=[16], d_attention=[8])


@pytest.fixture(scope="module")
def trained():
    """A G and D whose BatchNorm statistics, spectral-norm vectors and gammas differ from a fresh build."""
    torch.manual_seed(0)
    g, d = build_models(CFG)
    for model in (g, d):
        for layer in model.modules():
            if hasattr(layer, "gamma"):
                with torch.no_grad():
                    layer.gamma.fill_(0.3)
    with torch.no_grad():
        for _ in range(3):
            d(g(torch.randn(4, 16), torch.tensor([0, 1, 2, 0])), torch.tensor([0, 1, 2, 0]))
    return g.eval(), d.eval()


def test_round_trip_gives_identical_outputs_and_metadata(tmp_path, trained):
    g, d = trained
    save_model(tmp_path / "g.safetensors", g, step=123, recipe="mine", ema=True)
    save_model(tmp_path / "d.safetensors", d, step=124)
    g2, info = load_model(tmp_path / "g.safetensors", expect="generator")
    d2, dinfo = load_model(tmp_path / "d.safetensors")
    assert (info.kind, info.config, info.step, info.recipe, info.ema) == ("generator", CFG, 123, "mine", True)
    assert (dinfo.kind, dinfo.step, dinfo.recipe, dinfo.ema) == ("discriminator", 124, "recipe", False)
    assert not g2.training and not d2.training
    z, y = torch.randn(3, 16), torch.tensor([2, 1, 0])
    with torch.no_grad():
        images = g(z, y)
        assert torch.equal(g2(z, y), images)
        assert torch.equal(d2(images, y), d(images, y))
        assert not torch.equal(build_models(CFG)[0].eval()(z, y), images)  # the weights really came from the file
    assert read_info(tmp_path / "g.safetensors").config == CFG


def test_wrong_kind_is_refused(tmp_path, trained):
    save_model(tmp_path / "d.safetensors", trained[1], step=1)
    with pytest.raises(UserError, match="holds a discriminator"):
        load_model(tmp_path / "d.safetensors", expect="generator")


def test_unreadable_files_are_user_errors(tmp_path, trained):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="not a file"):
        load_model(tmp_path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(UserError, match="not a safetensors checkpoint"):
        load_model(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(UserError, match="not a sagan checkpoint"):
        load_model(foreign)


def test_damaged_metadata_and_mismatched_weights(tmp_path, trained):
    good = tmp_path / "g.safetensors"
    save_model(good, trained[0], step=5)
    tensors = load_file(str(good))
    meta = {"sagan.kind": "generator", "sagan.step": "5"}
    save_file(tensors, str(tmp_path / "bad_config.safetensors"), metadata={**meta, "sagan.config": "{oops"})
    with pytest.raises(UserError, match="damaged model config"):
        load_model(tmp_path / "bad_config.safetensors")
    other = json.dumps({**CFG.to_dict(), "g_ch": 16})
    save_file(tensors, str(tmp_path / "mismatch.safetensors"), metadata={**meta, "sagan.config": other})
    with pytest.raises(UserError, match="do not match"):
        load_model(tmp_path / "mismatch.safetensors")


def test_writes_are_atomic(tmp_path, trained):
    path = tmp_path / "g.safetensors"
    save_model(path, trained[0], step=1)
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]  # no temp file left behind
    before = path.read_bytes()

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]
    assert load_model(path)[1].step == 1
    save_model(tmp_path / "new" / "dir" / "g.safetensors", trained[0], step=2)  # parents are created
    assert read_info(tmp_path / "new" / "dir" / "g.safetensors").step == 2


def test_written_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600): the final file must be readable as any new file is."""
    import os

    from sagan_cli.interchange.checkpoint import atomic_write

    mask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


def _with_metadata(src, dst, **changes):
    """A copy of a file whose JSON config metadata (key `config_key`) has `changes`: as a damaged or hostile
    file would say."""
    from safetensors import safe_open

    key = changes.pop("config_key", "sagan.config")
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta[key] = json.dumps({**json.loads(meta[key]), **changes})
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def _limited_cli(*commands, gigabytes: int = 20) -> list[tuple[int, str]]:
    """The real command line in one process that may map at most 20 GB: before the bounds, the absurd sizes
    below allocated until the process died (or the machine did). Several commands share the process (and its
    limit): one `import torch` instead of one per command. (exit code, stderr) for each."""
    import resource

    from helpers import sagan_in_one_process

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (gigabytes * 2**30, gigabytes * 2**30))

    return sagan_in_one_process(*commands, preexec_fn=limit)


@pytest.mark.parametrize("field, value", [("num_classes", 10**11), ("num_classes", 10**8), ("z_dim", 10**9),
                                          ("g_ch", 2**20), ("d_ch", 2**24)])
def test_absurd_sizes_in_a_checkpoint_are_refused_before_any_allocation(tmp_path, trained, field, value):
    g, d = trained
    for kind, model in (("g", g), ("d", d)):
        good = save_model(tmp_path / f"{kind}.safetensors", model, step=1)
        bad = _with_metadata(good, tmp_path / f"{kind}-bad.safetensors", **{field: value})
        with pytest.raises(UserError, match=f"model.{field} = {value}, beyond"):
            read_info(bad)
    if (field, value) != ("num_classes", 10**11):  # the command line once: it costs a few seconds a call
        return
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 30)).save(photo)
    commands = (["sample", "--ckpt", tmp_path / "g-bad.safetensors", "-n", 1, "--out", tmp_path / "s"],
                ["attn-map", photo, "--ckpt", tmp_path / "d-bad.safetensors", "--out", tmp_path / "a.png"],
                ["export", "--ckpt", tmp_path / "g-bad.safetensors", "--format", "torchscript"])
    for args, (code, stderr) in zip(commands, _limited_cli(*commands), strict=True):
        assert code == 2 and stderr.startswith("error: ") and len(stderr.splitlines()) == 1, \
            (args[0], code, stderr[-500:])
        assert f"model.{field} = {value}" in stderr


@pytest.mark.parametrize("field, value", [("width", 10**9), ("num_classes", 10**10), ("resolution", 10**6),
                                          ("channels", 7), ("width", True)])
def test_absurd_sizes_in_a_classifier_file_are_refused(tmp_path, field, value):
    from sagan_cli.evaluation.classifier import Classifier, ClassifierConfig, load_classifier, save_classifier

    good = tmp_path / "c.safetensors"
    save_classifier(good, Classifier(ClassifierConfig(3, 32, 3, 8)), dataset="x", class_names=["a", "b", "c"],
                    test_accuracy=0.5, test_images=1, test_set="none", train_images=1, epochs=1)
    bad = _with_metadata(good, tmp_path / "bad.safetensors", config_key="sagan.classifier_config", **{field: value})
    with pytest.raises(UserError, match=f"{field} = {value!r}"):
        load_classifier(bad)


def test_metadata_within_the_limits_but_not_matching_the_tensors_allocates_nothing(tmp_path, trained):
    """Sizes within the limits can still describe a model of tens of GB (conditional BN tables of 100,000
    classes at width 1024): the header's tensor shapes are checked on the meta device before anything is built,
    so a small file can only cost what it holds. Run capped at 6 GB: building first would die of it."""
    g, _ = trained
    good = save_model(tmp_path / "g.safetensors", g, step=1)
    bad = _with_metadata(good, tmp_path / "g-big.safetensors", arch="resnet", resolution=128, g_ch=1024, d_ch=1024,
                         num_classes=100_000, g_attention=[], d_attention=[])
    [(code, stderr)] = _limited_cli(["sample", "--ckpt", bad, "-n", 1, "--out", tmp_path / "s"], gigabytes=6)
    assert code == 2 and stderr.startswith("error: ") and len(stderr.splitlines()) == 1, (code, stderr[-500:])
    assert "do not match its model config" in stderr
