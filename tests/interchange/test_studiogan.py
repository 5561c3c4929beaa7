"""`sagan import-studiogan` against an independent functional re-implementation of StudioGAN's SAGAN forward.

The reference below is written from StudioGAN's key names and published facts, not from its code: torch's old
spectral_norm in eval mode (weight_orig / (u . W v), stored vectors), BatchNorm eps 1e-4, conditional BN with
gain 1 + W/sigma and bias W/sigma (embeddings `embed0/embed1`, or `gain/bias` linears on a one-hot label),
residual G blocks with nearest upsampling, D blocks whose in-place ReLU also reaches the shortcut, a shortcut
that convolves and then pools, attention with C/8 query/key, C/2 value, 2x2 max-pooled key/value, an output
conv and `sigma` as the residual weight, and a projection head. Widths are tiny; layouts are StudioGAN's.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import sagan_main
from typer.testing import CliRunner

from sagan_cli.cli import app
from sagan_cli.errors import UserError
from sagan_cli.interchange.checkpoint import load_model
from sagan_cli.interchange.studiogan import import_studiogan
from sagan_cli.model.generation import make_noise

Z_DIM = 16


def _layouts(resolution: int, g: int, d: int) -> tuple[list[int], list[int], list[int], list[bool]]:
    """StudioGAN's resnet tables: G widths (stem, then each block), D widths and which D blocks pool.
    resolution "64-2020": the 64x64 tables of its 2020 releases (G ends at 2 * g_conv_dim, D starts at 2 * d)."""
    if resolution == 32:
        return [4 * g] * 4, [2 * d] * 4, [3] + [2 * d] * 3, [True, True, False, False]
    if resolution == "64-2020":
        return [16 * g, 16 * g, 8 * g, 4 * g, 2 * g], [2 * d, 4 * d, 8 * d, 16 * d, 16 * d], \
            [3, 2 * d, 4 * d, 8 * d, 16 * d], [True, True, True, True, False]
    mult = {64: [16, 8, 4, 2, 1], 128: [16, 16, 8, 4, 2, 1]}[resolution]
    d_out = {64: [1, 2, 4, 8, 16], 128: [1, 2, 4, 8, 16, 16]}[resolution]
    return ([m * g for m in mult], [m * d for m in d_out], [3] + [m * d for m in d_out[:-1]],
            [True] * (len(d_out) - 1) + [False])


# (resolution, g_conv_dim, d_conv_dim, attn_g_loc, attn_d_loc, classes, cBN layout): StudioGAN's shipped
# SAGAN configs (CIFAR-10, the 64x64 ImageNet subsets, ImageNet 128) at tiny widths.
CASES = {
    "cifar10-embed": (32, 8, 8, [2], [1], 10, "embed"),
    "cifar10-onehot": (32, 8, 8, [2], [1], 10, "onehot"),
    "64-onehot": (64, 8, 8, [3], [1], 20, "onehot"),
    "64-2020-embed": ("64-2020", 8, 8, [3], [1], 20, "embed"),
    "imagenet128-embed": (128, 8, 8, [4], [1], 12, "embed"),
}


class _Random:
    """Seeded normal tensors; `shapes_only`: zeros (fast at real widths, for shape bookkeeping)."""

    def __init__(self, seed: int, shapes_only: bool = False):
        self.gen, self.shapes_only = torch.Generator().manual_seed(seed), shapes_only

    def __call__(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        if self.shapes_only:
            return torch.zeros(shape)
        return torch.randn(shape, generator=self.gen) * scale


def _sn(state: dict, prefix: str, shape: tuple[int, ...], rnd: _Random, bias: bool = True, scale=0.3) -> None:
    """An old-style spectral_norm layer: u and v after a few power iterations (near, not at, the top pair)."""
    w = rnd(*shape, scale=scale)
    mat = w.reshape(shape[0], -1)
    v = F.normalize(rnd(mat.shape[1]), dim=0)
    for _ in range(0 if rnd.shapes_only else 3):
        u = F.normalize(mat @ v, dim=0)
        v = F.normalize(mat.t() @ u, dim=0)
    u = F.normalize(mat @ v, dim=0) if rnd.shapes_only else u
    state[f"{prefix}.weight_orig"], state[f"{prefix}.weight_u"], state[f"{prefix}.weight_v"] = w, u, v
    if bias:
        state[f"{prefix}.bias"] = rnd(shape[0], scale=0.1)


def _bn(state: dict, prefix: str, c: int, rnd: _Random, affine: bool) -> None:
    state[f"{prefix}.running_mean"] = rnd(c, scale=0.2)
    state[f"{prefix}.running_var"] = 0.5 + rnd(c).abs()
    state[f"{prefix}.num_batches_tracked"] = torch.tensor(1234)
    if affine:
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = 1 + rnd(c, scale=0.2), rnd(c, scale=0.1)


def _cbn(state: dict, prefix: str, c: int, classes: int, layout: str, rnd: _Random) -> None:
    _bn(state, f"{prefix}.bn", c, rnd, affine=False)
    for name in (("embed0", "embed1") if layout == "embed" else ("gain", "bias")):
        shape = (classes, c) if layout == "embed" else (c, classes)
        _sn(state, f"{prefix}.{name}", shape, rnd, bias=False, scale=1.0)


def _attention(state: dict, prefix: str, c: int, rnd: _Random) -> None:
    for name, shape in (("conv1x1_theta", (c // 8, c, 1, 1)), ("conv1x1_phi", (c // 8, c, 1, 1)),
                        ("conv1x1_g", (c // 2, c, 1, 1)), ("conv1x1_attn", (c, c // 2, 1, 1))):
        _sn(state, f"{prefix}.{name}", shape, rnd, bias=False)
    state[f"{prefix}.sigma"] = torch.tensor([0.8])


def studiogan_generator_state(case: str, seed: int = 0, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    resolution, g, d, g_loc, _, classes, layout = CASES[case]
    widths = _layouts(resolution, g, d)[0]
    rnd, state, index = _Random(seed, shapes_only), {}, 0
    _sn(state, "linear0", (16 * widths[0], Z_DIM), rnd)
    for block in range(len(widths) - 1):
        cin, cout, p = widths[block], widths[block + 1], f"blocks.{index}.0"
        _cbn(state, f"{p}.bn1", cin, classes, layout, rnd)
        _sn(state, f"{p}.conv2d1", (cout, cin, 3, 3), rnd)
        _cbn(state, f"{p}.bn2", cout, classes, layout, rnd)
        _sn(state, f"{p}.conv2d2", (cout, cout, 3, 3), rnd)
        _sn(state, f"{p}.conv2d0", (cout, cin, 1, 1), rnd)
        index += 1
        if block + 1 in g_loc:
            _attention(state, f"blocks.{index}.0", cout, rnd)
            index += 1
    _bn(state, "bn4", widths[-1], rnd, affine=True)
    _sn(state, "conv2d5", (3, widths[-1], 3, 3), rnd)
    return state


def studiogan_discriminator_state(case: str, seed: int = 1, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    resolution, g, d, _, d_loc, classes, _ = CASES[case]
    _, outs, ins, down = _layouts(resolution, g, d)
    rnd, state, index = _Random(seed, shapes_only), {}, 0
    for block, (cin, cout) in enumerate(zip(ins, outs, strict=True)):
        p = f"blocks.{index}.0"
        _sn(state, f"{p}.conv2d1", (cout, cin, 3, 3), rnd)
        _sn(state, f"{p}.conv2d2", (cout, cout, 3, 3), rnd)
        if block == 0 or down[block] or cin != cout:
            _sn(state, f"{p}.conv2d0", (cout, cin, 1, 1), rnd)
        index += 1
        if block + 1 in d_loc:
            _attention(state, f"blocks.{index}.0", cout, rnd)
            index += 1
    _sn(state, "linear1", (1, outs[-1]), rnd)
    _sn(state, "embedding", (classes, outs[-1]), rnd, bias=False, scale=0.1)
    return state


# ---- the reference forward pass (StudioGAN semantics, eval mode) ----

def ref_weight(state: dict, prefix: str) -> torch.Tensor:
    w, u, v = (state[f"{prefix}.weight_{name}"] for name in ("orig", "u", "v"))
    return w / torch.dot(u, w.reshape(w.shape[0], -1) @ v)


def ref_conv(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    w = ref_weight(state, prefix)
    return F.conv2d(x, w, state.get(f"{prefix}.bias"), padding=w.shape[-1] // 2)


def ref_bn(state: dict, prefix: str, x: torch.Tensor, affine: bool) -> torch.Tensor:
    return F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                        state[f"{prefix}.weight"] if affine else None, state[f"{prefix}.bias"] if affine else None,
                        False, 0.0, 1e-4)


def ref_cbn(state: dict, prefix: str, x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    h = ref_bn(state, f"{prefix}.bn", x, affine=False)
    if f"{prefix}.embed0.weight_orig" in state:
        gain, bias = (F.embedding(y, ref_weight(state, f"{prefix}.{n}")) for n in ("embed0", "embed1"))
    else:
        onehot = F.one_hot(y, classes).float()
        gain, bias = (F.linear(onehot, ref_weight(state, f"{prefix}.{n}")) for n in ("gain", "bias"))
    return h * (1 + gain)[:, :, None, None] + bias[:, :, None, None]


def ref_attention(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    theta = ref_conv(state, f"{prefix}.conv1x1_theta", x).reshape(b, c // 8, h * w)
    phi = F.max_pool2d(ref_conv(state, f"{prefix}.conv1x1_phi", x), 2).reshape(b, c // 8, h * w // 4)
    g = F.max_pool2d(ref_conv(state, f"{prefix}.conv1x1_g", x), 2).reshape(b, c // 2, h * w // 4)
    attn = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)
    o = ref_conv(state, f"{prefix}.conv1x1_attn", (g @ attn.transpose(1, 2)).reshape(b, c // 2, h, w))
    return x + state[f"{prefix}.sigma"] * o


def _entries(state: dict) -> list[str]:
    count = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    return [f"blocks.{i}.0" for i in range(count)]


def ref_generator(state: dict, z: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    w = ref_weight(state, "linear0")
    h = F.linear(z, w, state["linear0.bias"]).reshape(z.shape[0], -1, 4, 4)
    for p in _entries(state):
        if f"{p}.sigma" in state:
            h = ref_attention(state, p, h)
            continue
        x0 = h
        h = F.interpolate(torch.relu(ref_cbn(state, f"{p}.bn1", h, y, classes)), scale_factor=2, mode="nearest")
        h = ref_conv(state, f"{p}.conv2d2", torch.relu(ref_cbn(state, f"{p}.bn2", ref_conv(state, f"{p}.conv2d1", h),
                                                               y, classes)))
        h = h + ref_conv(state, f"{p}.conv2d0", F.interpolate(x0, scale_factor=2, mode="nearest"))
    h = torch.relu(ref_bn(state, "bn4", h, affine=True))
    return torch.tanh(ref_conv(state, "conv2d5", h))


def ref_discriminator(state: dict, x: torch.Tensor, y: torch.Tensor, down: list[bool]) -> torch.Tensor:
    h, block = x, 0
    for p in _entries(state):
        if f"{p}.sigma" in state:
            h = ref_attention(state, p, h)
            continue
        if block == 0:  # the optimised first block: no ReLU on the image; the shortcut pools, then convolves
            out = F.avg_pool2d(ref_conv(state, f"{p}.conv2d2", torch.relu(ref_conv(state, f"{p}.conv2d1", h))), 2)
            h = out + ref_conv(state, f"{p}.conv2d0", F.avg_pool2d(h, 2))
        else:
            h = torch.relu(h)  # in place in StudioGAN: the shortcut sees it too
            out = ref_conv(state, f"{p}.conv2d2", torch.relu(ref_conv(state, f"{p}.conv2d1", h)))
            shortcut = ref_conv(state, f"{p}.conv2d0", h) if f"{p}.conv2d0.weight_orig" in state else h
            if down[block]:
                out, shortcut = F.avg_pool2d(out, 2), F.avg_pool2d(shortcut, 2)
            h = out + shortcut
        block += 1
    features = torch.relu(h).sum(dim=(2, 3))
    score = F.linear(features, ref_weight(state, "linear1"), state["linear1.bias"]).squeeze(1)
    return score + (F.embedding(y, ref_weight(state, "embedding")) * features).sum(1)


def _save(root: Path, case: str) -> tuple[dict, dict]:
    g_state, d_state = studiogan_generator_state(case), studiogan_discriminator_state(case)
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.0, 0.999), "params": [0, 1]}]}
    torch.save({"state_dict": g_state, "optimizer": optimizer}, root / "G.pth")
    torch.save({"state_dict": d_state, "optimizer": optimizer, "seed": 0, "run_name": "SAGAN-train-x", "step": 100,
                "epoch": 3, "best_step": 100, "best_fid": np.float64(10.35), "best_fid_checkpoint_path": "x"},
               root / "D.pth")
    return g_state, d_state


@pytest.fixture(scope="module", params=list(CASES))
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp(request.param)
    g_state, d_state = _save(root, request.param)
    _, _, _, g_loc, d_loc, classes, _ = CASES[request.param]
    resolution = _resolution(request.param)
    config = root / "SAGAN.yaml"
    config.write_text(f"DATA:\n  img_size: {resolution}\n  num_classes: {classes}\nMODEL:\n  apply_attn: True\n"
                      f"  attn_g_loc: {g_loc}\n  attn_d_loc: {d_loc}\n")
    import_studiogan(root / "G.pth", root / "D.pth", root / "out", config)
    return {"case": request.param, "g_state": g_state, "d_state": d_state, "out": root / "out"}


def _resolution(case: str) -> int:
    return 64 if CASES[case][0] == "64-2020" else CASES[case][0]


def test_generator_gives_studiogans_images(imported: dict):
    _, _, _, _, _, classes, _ = CASES[imported["case"]]
    resolution = _resolution(imported["case"])
    g, info = load_model(imported["out"] / "g.safetensors", expect="generator")
    assert (info.config.resolution, info.config.num_classes, info.config.bn_eps) == (resolution, classes, 1e-4)
    z, y = make_noise(4, Z_DIM, seed=3), torch.tensor([0, 1, classes - 1, 3])
    with torch.no_grad():
        ours, theirs = g(z, y), ref_generator(imported["g_state"], z, y, classes)
        no_attention = {**imported["g_state"], **{k: torch.zeros(1) for k in imported["g_state"] if k.endswith("sigma")}}
        moved = (ref_generator(no_attention, z, y, classes) - theirs).abs().max().item()
    diff = (ours - theirs).abs().max().item()
    print(f"{imported['case']}: G max abs pixel difference {diff:.3g}")
    assert ours.shape == theirs.shape == (4, 3, resolution, resolution)
    assert diff <= 1e-4
    assert theirs.std() > 0.05 and moved > 100 * max(diff, 1e-7)  # not flat, and attention matters


def test_discriminator_gives_studiogans_scores(imported: dict):
    layout, _, _, _, _, classes, _ = CASES[imported["case"]]
    resolution = _resolution(imported["case"])
    d, _ = load_model(imported["out"] / "d.safetensors", expect="discriminator")
    down = _layouts(layout, 8, 8)[3]
    x = torch.rand(4, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.tensor([2, 0, classes - 1, 1])
    with torch.no_grad():
        ours, theirs = d(x, y), ref_discriminator(imported["d_state"], x, y, down)
    diff = (ours - theirs).abs().max().item()
    print(f"{imported['case']}: D max abs score difference {diff:.3g} (scores up to {theirs.abs().max():.3g})")
    assert ours.shape == theirs.shape == (4,)
    assert diff <= 1e-4 * max(1.0, theirs.abs().max().item())


def test_real_widths_and_recipe_shapes():
    """At StudioGAN's real widths (CIFAR-10: g_conv_dim 64, d_conv_dim 64; ImageNet 128: 64/64) the config that
    the importer infers builds models whose tensors have StudioGAN's shapes (no forward: shape bookkeeping only)."""
    from sagan_cli.interchange.studiogan import studiogan_config

    CASES["cifar10-real"] = (32, 64, 64, [2], [1], 10, "embed")
    CASES["imagenet128-real"] = (128, 64, 64, [4], [1], 1000, "onehot")
    try:
        for case, g_widths, d_widths in (("cifar10-real", [256] * 4, [128] * 4), ("imagenet128-real", [], [])):
            config = studiogan_config(studiogan_generator_state(case, shapes_only=True),
                                      studiogan_discriminator_state(case, shapes_only=True))
            assert (config.g_widths, config.d_widths) == (g_widths, d_widths)
            if case == "cifar10-real":
                assert (config.g_attention, config.d_attention, config.d_block_sizes) == ([16], [16], [16, 8, 8, 8])
            else:
                assert (config.g_attention, config.d_attention, config.g_ch, config.d_ch) == ([64], [64], 64, 64)
    finally:
        del CASES["cifar10-real"], CASES["imagenet128-real"]


def _refusal(tmp_path: Path, content, option: str = "--g") -> str:
    path = tmp_path / "x.pth"
    torch.save(content, path)
    with pytest.raises(UserError) as err:
        import_studiogan(path if option == "--g" else None, path if option == "--d" else None, tmp_path / "out")
    return str(err.value)


def test_refusals_are_one_line(tmp_path: Path):
    g_state = studiogan_generator_state("cifar10-embed")
    messages = [
        _refusal(tmp_path, {"state_dict": {"l1.0.module.weight_bar": torch.ones(2)}}),  # the port's layout
        _refusal(tmp_path, {"state_dict": studiogan_discriminator_state("cifar10-embed")}),  # D given as G
        _refusal(tmp_path, {"state_dict": {**g_state, "extra.weight": torch.ones(3)}}),  # more than SAGAN
        _refusal(tmp_path, {"state_dict": {**g_state, "linear0.weight_orig": torch.empty(0, 16)}}),  # empty tensor
        _refusal(tmp_path, [1, 2, 3]),
        _refusal(tmp_path, {"state_dict": {k.replace("weight_orig", "weight"): v for k, v in g_state.items()}}),
        _refusal(tmp_path, {"state_dict": {**g_state, "blocks.0.0.conv2d1.weight_orig": torch.ones(3)}}),
    ]
    assert "StudioGAN's SAGAN generator" in messages[0] and "swap --g and --d" in messages[1]
    assert "extra.weight" in messages[2] and "holds no numbers" in messages[3]
    assert "linear0.weight_orig" in messages[5] and "should be a 4-d tensor" in messages[6]
    assert all("\n" not in message for message in messages)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_beyond_plain_data_is_refused(tmp_path: Path):
    message = _refusal(tmp_path, {"state_dict": studiogan_generator_state("cifar10-embed"), "x": Evil()})
    assert "pickled objects" in message and "\n" not in message


def test_commands_run_on_an_import(imported_cli: Path):
    """sample, attn-map (D on a sample), report, interpolate --classes and export on an imported ImageNet 128 model
    (StudioGAN's layout at tiny widths), through the CLI."""
    out = imported_cli
    for args in (["sample", "--ckpt", str(out / "g.safetensors"), "-n", "4", "--out", str(out / "s"), "--class", "3"],
                 ["attn-map", str(out / "s" / "000000.png"), "--ckpt", str(out / "d.safetensors"),
                  "--out", str(out / "a.png")],
                 ["report", str(out), "--out", str(out / "r.html"), "--samples", "1", "--dataset-images", "0"],
                 ["interpolate", "--ckpt", str(out / "g.safetensors"), "--classes", "0,3", "--steps", "3",
                  "--out", str(out / "i")],
                 ["export", "--ckpt", str(out / "g.safetensors"), "--format", "torchscript",
                  "--out", str(out / "g.pt")]):
        started = time.perf_counter()
        done = CliRunner().invoke(app, args)
        print(f"{args[0]}: {time.perf_counter() - started:.1f} s")
        assert done.exit_code == 0, (args[0], done.output[-2000:])


@pytest.fixture(scope="module")
def imported_cli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    _save(root, "imagenet128-embed")  # the case: StudioGAN's ImageNet 128 layout (tiny widths), 2020 cBN
    code, _, err = sagan_main("import-studiogan", "--g", root / "G.pth", "--d", root / "D.pth", "--out", root / "out")
    assert code == 0, err
    code, _, err = sagan_main("import-studiogan", "--g", root / "D.pth", "--out", root / "bad")
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return root / "out"


@pytest.mark.parametrize("values, key", [
    ({"arch": "dcgan", "g_widths": [64] * 4}, "model.g_widths"),
    ({"arch": "resnet", "resolution": 32, "g_widths": [64] * 3}, "model.g_widths"),
    ({"arch": "resnet", "resolution": 32, "d_widths": [64] * 3}, "model.d_widths"),
    ({"arch": "resnet", "resolution": 32, "g_widths": [64, 64, 60, 64]}, "model.g_widths"),
    ({"arch": "resnet", "resolution": 32, "d_block_sizes": [16, 4, 4]}, "model.d_block_sizes"),
    ({"arch": "resnet", "resolution": 32, "d_block_sizes": [32, 16]}, "model.d_block_sizes"),
    ({"arch": "resnet", "resolution": 32, "d_block_sizes": [16, 8, 8], "d_attention": [4]}, "model.d_attention"),
    ({"arch": "dcgan", "d_shortcut_relu": True}, "model.d_shortcut_relu"),
    ({"bn_eps": 0.0}, "model.bn_eps"),
])
def test_the_new_model_keys_are_validated(values: dict, key: str):
    from sagan_cli.config import ModelConfig

    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        ModelConfig.from_dict(values)


def test_d_block_sizes_build_the_blocks_they_say():
    """[16, 8, 8]: the first two blocks pool, the third keeps 8x8; attention at 8 sits after the first 8x8 block."""
    from sagan_cli.config import ModelConfig
    from sagan_cli.model.models import Discriminator

    config = ModelConfig(arch="resnet", resolution=32, d_ch=8, d_block_sizes=[16, 8, 8], d_widths=[8, 16, 16],
                         d_attention=[8], attention="paper")
    d = Discriminator(config)
    assert [block.down for block in d.blocks] == [True, True, False]
    assert [attention is not None for _, attention in d.stages] == [False, True, False]
    assert d.blocks[2].shortcut is None and d(torch.zeros(2, 3, 32, 32)).shape == (2,)


@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2, reason="numpy 1 writes the old name itself")
def test_a_numpy_1_best_fid_loads(tmp_path: Path):
    """Files written under numpy 1 name its scalar constructor numpy.core.multiarray.scalar: allow-listed too."""
    import zipfile

    from sagan_cli.interchange.studiogan import load_studiogan_state

    torch.save({"state_dict": {"a": torch.ones(2)}, "best_fid": np.float64(10.35)}, tmp_path / "new.pth")
    with zipfile.ZipFile(tmp_path / "new.pth") as source, zipfile.ZipFile(tmp_path / "old.pth", "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(name, data)
    assert list(load_studiogan_state(tmp_path / "old.pth", "--d")) == ["a"]
