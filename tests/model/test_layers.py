"""SelfAttention against the formula (README, "How the model maps to the paper"): values, gradients, kernels, maps."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sagan_cli.model import layers
from sagan_cli.model.layers import SelfAttention, fused_attention

TOL = 1e-5


def formula(block: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The attention formula, written out from the block's (spectrally normalised) conv weights."""

    def conv1x1(conv, t):
        w = conv.weight.flatten(1)  # [Cout, Cin]
        out = torch.einsum("oc,bchw->bohw", w, t)
        return out if conv.bias is None else out + conv.bias[None, :, None, None]

    b, c, h, w = x.shape
    q, k, v = conv1x1(block.query, x), conv1x1(block.key, x), conv1x1(block.value, x)
    if block.variant == "paper":
        k, v = F.max_pool2d(k, 2), F.max_pool2d(v, 2)
    q, k, v = q.reshape(b, q.shape[1], -1), k.reshape(b, k.shape[1], -1), v.reshape(b, v.shape[1], -1)
    a = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)  # [B, N, M], no 1/sqrt(d)
    o = torch.bmm(v, a.transpose(1, 2)).reshape(b, -1, h, w)
    if block.variant == "paper":
        o = conv1x1(block.out, o)
    return x + block.gamma * o


def fused_path(block: SelfAttention, x: torch.Tensor, heads=None) -> torch.Tensor:
    """The SDPA kernel path, whatever `forward` picks at this map size."""
    q, k, v = block._qkv(x)
    return block._finish(x, fused_attention(q, k, v, heads=heads))


def make_block(channels: int, variant: str, gamma: float = 0.7, seed: int = 0) -> SelfAttention:
    torch.manual_seed(seed)
    block = SelfAttention(channels, variant)
    with torch.no_grad():
        block.gamma.fill_(gamma)  # at gamma = 0 the output would not depend on attention at all
    # eval: spectral norm reuses its u/v, so every path sees the same weights
    return block.eval()


def value_and_grads(fn, block, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    y = fn(x)
    y.backward(grad_out)
    params = {name: p.grad.clone() for name, p in block.named_parameters()}
    return y.detach(), x.grad, params


def assert_close(a, b, what, scale=None):
    """Max abs diff < 1e-5, relative to the size of the values once they exceed 1: a parameter's
    gradient sums over every position (gamma's is ~75 here), and fp32 spacing grows with magnitude."""
    scale = max(1.0, b.abs().max().item() if scale is None else scale)
    diff = (a - b).abs().max().item()
    assert diff < TOL * scale, f"{what}: max abs diff {diff:.3g} at scale {scale:.3g}"


SHAPES = [(1, 16, 4, 4), (2, 16, 8, 8), (3, 64, 8, 8), (2, 64, 16, 16), (1, 16, 8, 12), (2, 32, 16, 16)]


@pytest.mark.parametrize("variant", ["seed", "paper"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_all_paths_match_the_formula_values_and_gradients(variant, shape):
    block = make_block(shape[1], variant)
    torch.manual_seed(1)
    x, grad_out = torch.randn(shape), torch.randn(shape)
    want = value_and_grads(lambda t: formula(block, t), block, x, grad_out)
    paths = {
        "forward": block,
        "fused": lambda t: fused_path(block, t),
        "fused heads=2": lambda t: fused_path(block, t, heads=2),
        "reference_forward": block.reference_forward,
    }
    for name, fn in paths.items():
        y, gx, gp = value_and_grads(fn, block, x, grad_out)
        assert_close(y, want[0], f"{name} output")
        assert (y - x).abs().max() > 1e-3, "attention must change the output when gamma != 0"
        assert_close(gx, want[1], f"{name} grad x")
        assert set(gp) == set(want[2]) and len(gp) >= 4
        for pname in gp:
            # the key bias adds a constant to each softmax row, so its true gradient is 0 and what
            # every path computes is cancellation noise of sums as large as the key weight's gradient
            scale = want[2]["key.parametrizations.weight.original"].abs().max().item() if pname == "key.bias" else None
            if pname == "gamma":  # one sum over every output element: fp32 error grows like sqrt(terms)
                scale = max(want[2]["gamma"].abs().item(), x.numel() ** 0.5 / 32)
            assert_close(gp[pname], want[2][pname], f"{name} grad {pname}", scale)
        assert gp["gamma"].abs() > 0


def test_forward_matches_reference_at_small_and_large_maps():
    block = make_block(64, "seed")
    for side in (4, 8, 16, 32):
        x = torch.randn(2, 64, side, side)
        with torch.no_grad():
            assert_close(block(x), block.reference_forward(x), f"{side}x{side}")


def test_multi_head_split_is_exact_in_isolation():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 64), torch.randn(2, 8, 16), torch.randn(2, 32, 16)
    want = v @ torch.softmax(q.transpose(1, 2) @ k, -1).transpose(1, 2)
    for heads in (1, 2, 4):
        assert_close(fused_attention(q, k, v, heads=heads), want, f"heads={heads}")


@pytest.mark.parametrize("variant", ["seed", "paper"])
def test_gamma_zero_is_an_exact_identity_at_init(variant):
    torch.manual_seed(0)
    block = SelfAttention(32, variant)
    assert block.gamma.item() == 0.0
    x = torch.randn(2, 32, 16, 16)
    assert torch.equal(block(x), x)  # train mode, as in the first training step
    assert torch.equal(block.eval()(x), x)


def _ops(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("variant", ["seed", "paper"])
def test_large_maps_run_the_cpu_flash_kernel_not_the_math_path(variant):
    block = make_block(64, variant)
    x = torch.randn(1, 64, 32, 32, requires_grad=True)
    out = {}
    forward = _ops(lambda: out.setdefault("y", block(x)))
    backward = _ops(lambda: out["y"].sum().backward())
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in forward
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in backward
    for ops in (forward, backward):
        assert not any("_scaled_dot_product_attention_math" in op for op in ops)


@pytest.mark.parametrize("variant", ["seed", "paper"])
def test_attention_weights_rows_and_points(variant):
    block = make_block(32, variant)
    x = torch.randn(2, 32, 8, 12)  # H=8, W=12: (x, y) must use the width
    a = block.attention_weights(x)
    m = 8 * 12 // (4 if variant == "paper" else 1)
    assert a.shape == (2, 96, m)
    assert block.key_shape(8, 12) == ((4, 6) if variant == "paper" else (8, 12))
    assert torch.allclose(a.sum(-1), torch.ones(2, 96), atol=1e-6)
    assert (a >= 0).all() and a.std() > 0
    flat = block.attention_weights(x, points=[0, 13, 95])
    pairs = block.attention_weights(x, points=[(0, 0), (1, 1), (11, 7)])  # (x, y) -> y * 12 + x
    tensor = block.attention_weights(x, points=torch.tensor([13]))
    assert flat.shape == pairs.shape == (2, 3, m)
    assert torch.allclose(flat, a[:, [0, 13, 95]]) and torch.allclose(pairs, flat)
    assert torch.allclose(tensor, a[:, [13]])


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="variant"):
        SelfAttention(32, "official")
    with pytest.raises(ValueError, match="multiple of 8"):
        SelfAttention(20)


def test_spectral_norm_and_bias_options():
    plain = SelfAttention(32, "seed", spectral_norm=False)
    assert not hasattr(plain.query, "parametrizations")
    assert plain.query.bias is not None and plain.out is None
    paper = SelfAttention(32, "paper")
    assert paper.query.bias is None and paper.out.weight.shape == (32, 16, 1, 1)
    assert hasattr(paper.out, "parametrizations")


def test_orthogonal_init_gives_orthonormal_pre_sn_weights():
    block = SelfAttention(64, "paper", init="orthogonal")
    for conv in (block.query, block.key, block.value, block.out):
        w = conv.parametrizations.weight.original.flatten(1)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-5)
    with pytest.raises(ValueError, match="init"):
        layers.init_weights(torch.nn.Conv2d(8, 8, 1), "kaiming-ish")


def test_batched_power_iterations_equal_the_layer_by_layer_spectral_norm():
    """`power_iterations` (a network's iterations as foreach kernels) gives the very numbers each layer's
    own training forward gives, and torch's spectral norm agrees with both (u, v, W/sigma and its gradient)."""
    import copy

    from torch.nn.utils.parametrizations import spectral_norm

    from sagan_cli.model.layers import power_iterations, sn

    torch.manual_seed(0)
    makers = [lambda: torch.nn.Conv2d(8, 16, 3), lambda: torch.nn.ConvTranspose2d(16, 8, 4, 2, 1),
              lambda: torch.nn.Linear(5, 7), lambda: torch.nn.Embedding(4, 6)]
    ours = torch.nn.ModuleList([sn(make().double(), init="default") for make in makers])
    theirs = torch.nn.ModuleList([spectral_norm(make().double()) for make in makers])
    theirs.load_state_dict(ours.state_dict())
    batched = copy.deepcopy(ours)
    power_iterations(batched)
    grads = [torch.randn_like(m.parametrizations.weight.original) for m in ours]  # m.weight would iterate
    for models in (ours, batched, theirs):
        sum((m.weight * g).sum() for m, g in zip(models, grads, strict=True)).backward()
    for a, b, t in zip(ours, batched, theirs, strict=True):
        pa, pb, pt = (m.parametrizations.weight for m in (a, b, t))
        assert torch.equal(pa.original.grad, pb.original.grad) and torch.equal(pa[0]._u, pb[0]._u)
        assert torch.allclose(pa.original.grad, pt.original.grad, atol=1e-12)
        assert torch.allclose(pa[0]._v, pt[0]._v, atol=1e-12) and pb[0].prepared is None
