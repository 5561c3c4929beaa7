"""CUDA-only checks: attention kernels, a bf16 and a compiled step, resume on the GPU. Skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sagan_cli.layers import SelfAttention

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


@pytest.mark.parametrize("settings", [{"mixed_precision": "bf16"}, {"compile": True}, {"mixed_precision": "bf16", "compile": True}],
                         ids=["bf16", "compiled", "bf16-compiled"])
def test_a_bf16_and_a_compiled_step_stay_finite(tmp_path, settings):
    from sagan_cli.train import run_training

    result = run_training(tiny(tmp_path, **settings), tmp_path / "run")
    assert next(result.generator.parameters()).is_cuda
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "loss_d" in x]
    assert len(records) == 4 and all(abs(r["loss_d"]) < 1e6 and abs(r["loss_g"]) < 1e6 for r in records)
    assert all(torch.isfinite(p).all() for p in result.generator.parameters())


def test_resume_on_cuda_continues_exactly(tmp_path):
    from sagan_cli.train import run_training

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    straight = run_training(tiny(tmp_path), tmp_path / "a")
    run_training(tiny(tmp_path, steps=2), tmp_path / "b")
    resumed = run_training(tiny(tmp_path), tmp_path / "b", resume=True)
    for (name, a), (_, b) in zip(straight.generator.state_dict().items(), resumed.generator.state_dict().items(),
                                 strict=True):
        assert torch.allclose(a, b, atol=1e-4), name  # atomics in some CUDA kernels: close, not bit-exact
