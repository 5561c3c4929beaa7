"""Differentiable augmentation (train.augment): each op per sample, on the input's device and dtype, with
gradients to the input; the phases augment what D sees (and only that); training with it on works for each
kind of model and resumes exactly; off, it is the identity and draws nothing; bad policies are one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_garments, write_idx
from helpers import assert_one_error_line, run_main, tiny_recipe

from sagan_cli.config import AUGMENT_OPS, ModelConfig, recipe_from_dict
from sagan_cli.errors import UserError
from sagan_cli.model.models import Discriminator, Generator
from sagan_cli.training.augment import OPS, color, cutout, identity, make_augment, translation
from sagan_cli.training.loop import run_training
from sagan_cli.training.step import Phases, make_optimizer, update_plan

ALL = "color,translation,cutout"


def positive_batch(n: int = 16, channels: int = 3, size: int = 32) -> torch.Tensor:
    """Values in [0.1, 1]: a zero in the output can only be fill, never content."""
    torch.manual_seed(0)
    return torch.rand(n, channels, size, size) * 0.9 + 0.1


def test_the_policy_names_are_the_ops():
    assert tuple(OPS) == AUGMENT_OPS


def test_translation_shifts_each_sample_by_whole_pixels_and_fills_with_zeros():
    images = positive_batch()
    out = translation(images)
    shifts = []
    for x, y in zip(images, out, strict=True):
        found = []
        for dy in range(-4, 5):  # up to 1/8 of 32 each way
            for dx in range(-4, 5):
                expected = torch.zeros_like(x)
                expected[:, max(dy, 0):32 + min(dy, 0), max(dx, 0):32 + min(dx, 0)] = \
                    x[:, max(-dy, 0):32 + min(-dy, 0), max(-dx, 0):32 + min(-dx, 0)]
                if torch.equal(y, expected):
                    found.append((dy, dx))
        assert len(found) == 1, found
        shifts.append(found[0])
    assert len(set(shifts)) > 4, shifts  # per sample: 16 draws of 81 shifts


def test_cutout_zeros_exactly_one_half_size_square_per_sample():
    images = positive_batch()
    out = cutout(images)
    corners = set()
    for x, y in zip(images, out, strict=True):
        zero = (y == 0).all(dim=0)
        assert (y == 0).any(dim=0).eq(zero).all()  # the same pixels in every channel
        assert int(zero.sum()) == 16 * 16
        rows, cols = zero.nonzero().unbind(1)
        top, left = int(rows.min()), int(cols.min())
        assert int(rows.max()) - top == 15 and int(cols.max()) - left == 15  # one 16 x 16 square
        assert torch.equal(y[:, ~zero], x[:, ~zero])  # the rest untouched
        corners.add((top, left))
    assert len(corners) > 4, corners


def test_color_on_rgb_shifts_the_mean_by_the_brightness_alone():
    images = positive_batch() * 2 - 1
    out = color(images)
    # saturation keeps each pixel's channel mean and contrast each image's mean: only brightness moves it
    shift = (out.mean(dim=(1, 2, 3)) - images.mean(dim=(1, 2, 3)))
    assert shift.abs().max() <= 0.5 + 1e-5
    assert shift.std() > 0.05  # a draw per sample
    assert out.abs().max() < 6  # |x + b| <= 1.5, x2 saturation, x1.5 contrast


def test_color_on_grayscale_is_a_per_sample_affine_map_with_the_papers_ranges():
    images = positive_batch(channels=1) * 2 - 1
    out = color(images)
    x, y = images.flatten(1), out.flatten(1)
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    gain = (xc * yc).sum(1) / (xc * xc).sum(1)  # least squares: y = gain * x + offset
    offset = y.mean(1) - gain * x.mean(1)
    assert torch.allclose(gain[:, None] * x + offset[:, None], y, atol=1e-5)
    assert ((gain >= 0.5 - 1e-5) & (gain <= 1.5 + 1e-5)).all()  # contrast; no saturation on one channel
    assert gain.std() > 0.05 and offset.std() > 0.05  # per sample


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_op_keeps_shape_dtype_and_device_and_differs_per_sample(op, dtype):
    same = torch.linspace(-1, 1, 3 * 32 * 32).view(1, 3, 32, 32).expand(8, -1, -1, -1).to(dtype)
    same = same.contiguous(memory_format=torch.channels_last)
    out = OPS[op](same)
    assert out.shape == same.shape and out.dtype == dtype and out.device == same.device
    assert torch.isfinite(out).all()
    assert len({out[i].float().sum().item() for i in range(8)}) > 1  # identical inputs, different outputs


@pytest.mark.parametrize("op", sorted(OPS))
def test_gradients_flow_to_the_input(op):
    images = (positive_batch(4) * 2 - 1).requires_grad_(True)
    weights_ = torch.randn_like(images)
    (OPS[op](images) * weights_).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    if op == "cutout":  # the zeroed square passes no gradient: exactly the 3 x 16 x 16 per sample
        assert int((images.grad == 0).sum()) == 4 * 3 * 16 * 16


def test_no_policy_is_the_identity_and_draws_nothing():
    assert make_augment("") is identity and make_augment("  ") is identity
    images = torch.rand(2, 3, 32, 32)
    before = torch.get_rng_state()
    assert make_augment("")(images) is images
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(make_augment(ALL)(images), images)
    assert not torch.equal(torch.get_rng_state(), before)  # on: it draws from the global generator


def test_policies_apply_in_the_order_written():
    images = positive_batch(4)
    torch.manual_seed(1)
    out = make_augment("cutout, translation")(images)
    torch.manual_seed(1)
    assert torch.equal(out, translation(cutout(images)))


def tiny_phases(augment: str) -> tuple[Phases, Generator, Discriminator]:
    torch.manual_seed(0)
    model = ModelConfig(resolution=32, z_dim=8, g_ch=8, d_ch=8, g_attention=[16], d_attention=[8])
    g, d = Generator(model), Discriminator(model)
    plan = update_plan("cpu", "no")
    phases = Phases(generator=g, discriminator=d, raw_g=g, raw_d=d, opt_g=make_optimizer(g, 1e-4, (0.0, 0.9), plan),
                    opt_d=make_optimizer(d, 4e-4, (0.0, 0.9), plan), loss="hinge", gp_weight=10.0, precision="no",
                    device=torch.device("cpu"), channels_last=False, plan=plan, augment=augment)
    return phases, g, d


def has_zero_square(image: torch.Tensor) -> bool:
    """A 16 x 16 square of zeros in every channel somewhere in a 32 x 32 image (cutout's mark)."""
    zero = (image == 0).all(dim=0).float()[None, None]
    return bool(torch.nn.functional.avg_pool2d(zero, 16, stride=1).max() == 1)


def test_d_sees_augmented_real_and_fake_in_both_phases_and_g_learns_through_it():
    phases, g, d = tiny_phases("cutout")
    seen = []
    hook = d.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    real = positive_batch(4) * 2 - 1
    phases.d_phase(real, None, torch.randn(4, 8), None, keep_fakes=True)
    kept = phases.pending_fake.detach().clone()
    g_stats = phases.g_phase(None, None)
    hook.remove()
    d_batch, g_batch = seen
    assert all(has_zero_square(image) for image in d_batch)  # 4 real, 4 fake, each cut
    assert not any(has_zero_square(image) for image in kept)  # what the G phase reuses is un-augmented ...
    assert all(has_zero_square(image) for image in g_batch)  # ... and cut afresh there
    assert not torch.equal(g_batch, d_batch[4:])  # a new draw, not the D phase's
    assert torch.isfinite(g_stats.loss)
    grads = [p.grad for p in g.parameters() if p.grad is not None]
    assert grads and sum(float(grad.abs().sum()) for grad in grads) > 0  # G's gradient came through cutout


def grey_recipe(root, classes: int, arch: str, precision: str):
    images, labels = tiny_garments(16)
    write_idx(root / "data" / "train-images-idx3-ubyte.gz", images)
    write_idx(root / "data" / "train-labels-idx1-ubyte.gz", labels)
    return recipe_from_dict({
        "data": {"kind": "idx", "path": str(root / "data")},
        "model": {"arch": arch, "resolution": 32, "num_classes": classes, "z_dim": 8, "g_ch": 8, "d_ch": 8,
                  "g_attention": [16], "d_attention": [8]},
        "train": {"steps": 2, "batch_size": 4, "sample_every": 2, "checkpoint_every": 2, "log_every": 1,
                  "sample_grid": 4, "mixed_precision": precision, "augment": ALL},
    }, name="grey")


# The hinge loss trains with augmentation in every other cell of tests/test_path_matrix.py (both channel counts,
# conditional or not, dcgan and resnet, fp32/bf16/fp16, one process and two, each followed by every command, and
# resume 2 + 2 == 4 steps bit for bit in the one-process cells); here the two other losses (WGAN-GP: its penalty
# on augmented images), each with a check that D sees only cut images.
KINDS = [(1, 0, "resnet", "fp16", "wgan-gp"), (3, 3, "resnet", "bf16", "nonsaturating")]


@pytest.mark.parametrize("channels, classes, arch, precision, loss", KINDS,
                         ids=["-".join(map(str, kind)) for kind in KINDS])
def test_training_with_augmentation_works_for_each_kind_of_model(tmp_path, channels, classes, arch, precision, loss):
    if channels == 1:
        recipe = grey_recipe(tmp_path, classes, arch, precision)
        recipe.train.loss = loss
    else:
        recipe = tiny_recipe(model__arch=arch, model__num_classes=classes, model__g_ch=8, model__d_ch=8,
                             model__z_dim=8, train__steps=2, train__batch_size=4, train__mixed_precision=precision,
                             train__loss=loss, train__augment=ALL)
    cut = []  # what D sees in training: every image cut (training builds its phases with the recipe's policy)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: cut.extend(has_zero_square(image) for image in args[0]) if module.training
        and isinstance(module, Discriminator) else None)
    try:
        result = run_training(recipe, tmp_path / "run")
    finally:
        hook.remove()
    assert result.step == 2 and len(cut) == 2 * 8 and all(cut)  # 2 D phases of 4 real + 4 fake
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss_d" in r][-1]  # (fp16 WGAN-GP logs NaN on its start-up overflow, augment or not)
    assert last["step"] == 2 and all(abs(last[key]) < 1e6 for key in ("loss_d", "loss_g")), last  # NaN fails <
    assert all(torch.isfinite(p).all() for net in (result.generator, result.discriminator) for p in net.parameters())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["augment"] == ALL
    assert (tmp_path / "run" / "g.safetensors").exists() and (tmp_path / "run" / "d.safetensors").exists()


@pytest.mark.parametrize("policy, names", [("bogus", ["train.augment", "'bogus'", "color, translation, cutout"]),
                                           ("color,,cutout", ["train.augment", "''"]),
                                           ("color,cutout,color", ["train.augment", "'color'", "more than once"])])
def test_a_bad_policy_is_one_error_line(tmp_path, capsys, monkeypatch, policy, names):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\nkind = "synthetic"\n')
    code, out, err = run_main(["train", str(recipe), "--out", str(tmp_path / "run"), "--set",
                               f"train.augment={policy}", "--dry-run"], capsys, monkeypatch)
    assert_one_error_line(code, out, err, names)
    with pytest.raises(UserError, match="train.augment"):
        recipe_from_dict({"train": {"augment": policy}})
