"""CUDA-only checks: attention kernels, a bf16 and a compiled step, resume on the GPU. Skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sagan_cli.model.layers import SelfAttention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def kernels(fn) -> str:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(event.key for event in prof.key_averages())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_runs_a_fused_kernel_without_padding_on_cuda(dtype):
    block = SelfAttention(256, "seed").cuda().train()
    x = torch.randn(4, 256, 64, 64, device="cuda", requires_grad=True)  # 4096 positions: the fused path

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            block(x).float().sum().backward()

    names = kernels(step)
    assert any(k in names for k in ("_efficient_attention", "_cudnn_attention", "_flash_attention")), names[:2000]
    assert "constant_pad_nd" not in names  # nothing padded on CUDA


def test_fp32_small_maps_take_the_explicit_matrix_and_match_the_fused_kernel():
    block = SelfAttention(64, "seed").cuda().eval()
    with torch.no_grad():
        block.gamma.fill_(0.7)
    x = torch.randn(2, 64, 16, 16, device="cuda")
    with torch.no_grad():
        assert torch.allclose(block(x), block.reference_forward(x), atol=1e-5)


def tiny(tmp_path, **train):
    from sagan_cli.config import recipe_from_dict

    raw = {"data": {"kind": "synthetic", "synthetic_size": 64},
           "model": {"resolution": 32, "g_ch": 16, "d_ch": 16, "g_attention": [16], "d_attention": [8]},
           "train": {"steps": 4, "batch_size": 8, "checkpoint_every": 2, "sample_every": 4, "log_every": 1,
                     "ema_start": 1, "sample_grid": 4, **train}}
    return recipe_from_dict(raw, name="gpu")


def records(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "loss_d" in x]


def all_finite(result) -> list[str]:
    """Names of the non-finite tensors of G, D and the EMA (parameters and buffers)."""
    models = {"g": result.generator, "d": result.discriminator, "ema": result.ema}
    return [f"{name}.{key}" for name, model in models.items() if model is not None
            for key, value in model.state_dict().items() if value.is_floating_point() and not torch.isfinite(value).all()]


@pytest.fixture(scope="module")
def fp32_reference(tmp_path_factory):
    """The eager fp32 run every other setting is compared with (same weights, data and noise)."""
    from sagan_cli.training.loop import run_training

    run = tmp_path_factory.mktemp("fp32") / "run"
    run_training(tiny(run.parent), run)
    return records(run)


@pytest.mark.parametrize(("settings", "tolerance"),
                         [({"mixed_precision": "bf16"}, 5e-2), ({"compile": True}, 1e-3),
                          ({"mixed_precision": "bf16", "compile": True}, 5e-2), ({"mixed_precision": "fp16"}, 1e-2)],
                         ids=["bf16", "compiled", "bf16-compiled", "fp16"])
def test_a_bf16_fp16_and_a_compiled_step_match_fp32(tmp_path, fp32_reference, settings, tolerance):
    from sagan_cli.training.loop import run_training

    result = run_training(tiny(tmp_path, **settings), tmp_path / "run")
    assert next(result.generator.parameters()).is_cuda
    got = records(tmp_path / "run")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss_d"], r["loss_g"], r["d_real"], r["d_fake"]])).all() for r in got)
    # D's numbers of step 1 come before any update (same weights, batch and noise): only the arithmetic differs
    # (G's loss of step 1 follows D's first update, which fp16 skips while its loss scale finds its level)
    for key in ("loss_d", "d_real", "d_fake"):
        assert got[0][key] == pytest.approx(fp32_reference[0][key], rel=tolerance, abs=tolerance), key
    assert all_finite(result) == []


def assert_close(a: torch.Tensor, b: torch.Tensor, scale: float, name: str) -> None:
    """Equal up to round-off: atomics in some CUDA kernels make a resumed run close, not bit-exact; `scale` is the
    largest magnitude of that kind of tensor (Adam turns round-off in near-zero gradients into lr-sized steps)."""
    if not a.is_floating_point():
        assert torch.equal(a, b), name
        return
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
    assert torch.allclose(a.double(), b.double(), rtol=1e-3, atol=1e-3 * scale + 1e-12), name


def test_resume_on_cuda_continues_exactly(tmp_path):
    from safetensors.torch import load_file

    from sagan_cli.training.loop import run_training
    from sagan_cli.training.state import latest_state

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    straight = run_training(tiny(tmp_path), tmp_path / "a")
    run_training(tiny(tmp_path, steps=2), tmp_path / "b")
    resumed = run_training(tiny(tmp_path), tmp_path / "b", resume=True)
    assert straight.step == resumed.step == 4
    for name in ("generator", "discriminator", "ema"):
        a, b = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        assert a.keys() == b.keys(), name
        for key in a:
            if key.endswith(("_u", "_v")) or "running_" in key or "num_batches" in key:
                assert_close(a[key], b[key], float(a[key].abs().max()) if a[key].is_floating_point() else 0, key)
            else:
                assert torch.allclose(a[key], b[key], atol=1e-4), f"{name}.{key}"
    # the optimizers: Adam's moments and step counts, as saved at step 4 by each run
    states = [latest_state(tmp_path / run / "state") for run in ("a", "b")]
    assert [s.name for s in states] == ["step-0000004"] * 2
    a, b = (load_file(str(s / "optimizers.safetensors")) for s in states)
    assert a.keys() == b.keys() and any(k.endswith("exp_avg_sq") for k in a)
    scale = {}
    for key, value in a.items():  # per optimizer and field
        kind = (key.split(".")[0], key.split(".")[-1])
        scale[kind] = max(scale.get(kind, 0.0), float(value.abs().max()) if value.is_floating_point() else 0.0)
    for key in a:
        kind = (key.split(".")[0], key.split(".")[-1])
        if kind[1] == "step":
            assert torch.equal(a[key], b[key]), key
        else:
            assert_close(a[key], b[key], scale[kind], key)
    progress = [json.loads((s / "progress.json").read_text()) for s in states]
    assert progress[0] == progress[1]
