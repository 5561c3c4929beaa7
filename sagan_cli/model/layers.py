"""Building blocks: self-attention, spectrally normalised layers, conditional BatchNorm, residual blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

# CUDA attention (FACTS.md, H200, torch 2.11): SDPA takes a value wider than query/key there, so nothing is
# padded. cuDNN's bf16/fp16 backward wants head widths <= 128; fp32 runs the memory-efficient kernel, which
# lost to the explicit matrix at a 32x32 map (0.67x at C=256) and won from 128x128 on (1.3x).
MAX_CUDA_HEAD_WIDTH = 128
CUDA_FP32_EXPLICIT_MAX_POSITIONS = 32 * 32


def init_weights(module: nn.Module, scheme: str) -> nn.Module:
    """Initialise a conv/linear/embedding weight in place (before spectral norm wraps it)."""
    weight = getattr(module, "weight", None)
    if weight is None or scheme == "default":
        return module
    with torch.no_grad():
        if scheme == "orthogonal":
            nn.init.orthogonal_(weight)
        elif scheme == "normal":
            nn.init.normal_(weight, 0.0, 0.02)
        elif scheme == "xavier":
            nn.init.xavier_uniform_(weight)
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    return module


class _DivideBySigma(torch.autograd.Function):
    """W / sigma with sigma = u^T W v from the power iteration, and torch's spectral-norm gradient
    (u and v held constant): dL/dW = (G - <G, W/sigma> u v^T) / sigma, written out once instead of
    autograd's chain through vdot, mv and the division (about half the backward operations)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int):
        normalized = weight / sigma
        ctx.save_for_backward(normalized, sigma, u, v)
        ctx.dim = dim
        return normalized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normalized, sigma, u, v = ctx.saved_tensors
        outer = torch.outer(u, v)  # in the layout of the weight matrix: dim `ctx.dim` first, the rest flattened
        if ctx.dim == 0:
            outer = outer.view(normalized.shape)
        else:
            shape = list(normalized.shape)
            moved = [shape[ctx.dim]] + shape[: ctx.dim] + shape[ctx.dim + 1:]
            outer = outer.view(moved).movedim(0, ctx.dim)
        return (grad - (grad * normalized).sum() * outer) / sigma, None, None, None, None


class FP32SpectralNorm(_SpectralNorm):
    """torch's spectral norm (same buffers, state-dict keys and eval formula; one power iteration per
    training forward), computed in fp32 with autocast off and with fewer operations in training mode.

    Training mode: u = W v / |W v|, then v' = W^T u / |W^T u|, and sigma = |W^T u|, which equals torch's
    u^T W v' exactly in real arithmetic; the division and its gradient are one autograd Function.
    Eval mode: sigma = u^T W v with the stored vectors, exactly as torch computes it.
    """

    prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (sigma, u, v) from `power_iterations`

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            if weight.ndim == 1:
                return super().forward(weight)
            if self.training and self.prepared is not None:  # this step's iteration, done for the whole network
                (sigma, u, v), self.prepared = self.prepared, None
                return _DivideBySigma.apply(weight, sigma, u, v, self.dim)
            matrix = self._reshape_weight_to_matrix(weight)
            if not self.training:
                return weight / torch.vdot(self._u, torch.mv(matrix, self._v))
            with torch.no_grad():
                if self.n_power_iterations > 1:
                    self._power_method(matrix, self.n_power_iterations - 1)
                (sigma,), (u,), (v,) = _iterate([self], [matrix])
            return _DivideBySigma.apply(weight, sigma, u, v, self.dim)


def _iterate(norms: list[FP32SpectralNorm], matrices: list[torch.Tensor]):
    """One power iteration for several layers at once (foreach kernels): u = W v / |W v|, v = W^T u / |W^T u|,
    both also written to the buffers, and sigma = |W^T u|. Returns (sigmas, us, vs)."""
    eps = norms[0].eps
    us = [torch.mv(matrix, norm._v) for matrix, norm in zip(matrices, norms, strict=True)]
    torch._foreach_div_(us, torch._foreach_clamp_min(torch._foreach_norm(us), eps))
    vs = [torch.mv(matrix.t(), u) for matrix, u in zip(matrices, us, strict=True)]
    sigmas = torch._foreach_norm(vs)
    torch._foreach_div_(vs, torch._foreach_clamp_min(sigmas, eps))
    torch._foreach_copy_([norm._u for norm in norms], us)
    torch._foreach_copy_([norm._v for norm in norms], vs)
    return sigmas, us, vs


@torch.no_grad()
def power_iterations(model: nn.Module) -> None:
    """One power iteration for every spectrally normalised weight of a training-mode `model`, batched:
    the norms, divisions and buffer copies of all layers are a few foreach kernels instead of a dozen
    operations per layer. Each layer's next training forward uses the result (then it is spent); the
    same `_iterate` serves a layer that iterates on its own, so the numbers are the same either way.
    """
    layers = [(module, module.parametrizations.weight) for module in model.modules()
              if parametrize.is_parametrized(module, "weight")
              and isinstance(module.parametrizations.weight[0], FP32SpectralNorm)]
    layers = [(module, weight_chain) for module, weight_chain in layers
              if weight_chain[0].training and weight_chain.original.ndim > 1
              and weight_chain[0].n_power_iterations == 1]
    if not layers:
        return
    norms = [weight_chain[0] for _, weight_chain in layers]
    with torch.autocast(layers[0][1].original.device.type, enabled=False):
        matrices = [norm._reshape_weight_to_matrix(weight_chain.original)
                    for norm, (_, weight_chain) in zip(norms, layers, strict=True)]
        sigmas, us, vs = _iterate(norms, matrices)
    for norm, sigma, u, v in zip(norms, sigmas, us, vs, strict=True):
        norm.prepared = (sigma, u, v)


def sn(module: nn.Module, enabled: bool = True, init: str = "orthogonal") -> nn.Module:
    """Initialise `module`, then wrap it in (fp32) spectral norm when `enabled`: one place for every layer."""
    init_weights(module, init)
    if not enabled:
        return module
    _spectral_norm(module)
    module.parametrizations.weight[0].__class__ = FP32SpectralNorm
    return module


def _cuda_heads(value_width: int, query_width: int) -> int:
    """Split the value into the fewest heads narrow enough for the CUDA fused kernels."""
    for heads in range(1, value_width // query_width + 1):
        width = value_width // heads
        if value_width % heads == 0 and width % 8 == 0 and width <= MAX_CUDA_HEAD_WIDTH:
            return heads
    return 1


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """o = v softmax(q^T k)^T through the full N x M matrix (q: [B, d, N], k: [B, d, M], v: [B, Cv, M])."""
    return v @ torch.softmax(q.transpose(1, 2) @ k, dim=-1).transpose(1, 2)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int | None = None,
                    pad: bool | None = None) -> torch.Tensor:
    """softmax(q^T k) applied to v through scaled_dot_product_attention, never forming the N x M matrix.

    q: [B, d, N], k: [B, d, M], v: [B, Cv, M] -> o: [B, Cv, N], with o = v softmax(q^T k)^T.

    SAGAN's query is narrower (C/8) than its value (C or C/2). The CPU flash kernel needs equal widths:
    zero-padding q and k to the value width leaves every dot product, hence the softmax, unchanged.
    CUDA's kernels take unequal widths, so there nothing is padded, and values wider than cuDNN accepts
    are split into heads that share the same q and k: also exact.
    """
    batch, query_width, query_positions = q.shape
    value_width, key_positions = v.shape[1], v.shape[2]
    if heads is None:
        heads = _cuda_heads(value_width, query_width) if q.is_cuda else 1
    if pad is None:
        pad = not q.is_cuda
    width = value_width // heads
    qk_width = width if pad else query_width
    # [B, h, N, w] with a contiguous last dimension: the fused kernels insist on it.
    q = F.pad(q.transpose(1, 2), (0, qk_width - query_width)) if pad else q.transpose(1, 2).contiguous()
    k = F.pad(k.transpose(1, 2), (0, qk_width - query_width)) if pad else k.transpose(1, 2).contiguous()
    if heads == 1:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.transpose(1, 2).contiguous().unsqueeze(1)
    else:
        q, k = (q.unsqueeze(1).expand(batch, heads, query_positions, qk_width),
                k.unsqueeze(1).expand(batch, heads, key_positions, qk_width))
        v = v.reshape(batch, heads, width, key_positions).transpose(2, 3).contiguous()
    attended = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # [B, h, N, w]
    return attended.transpose(2, 3).reshape(batch, value_width, query_positions)


def attention_path(x: torch.Tensor, positions: int) -> str:
    """'explicit' or 'fused' for a query map of `positions` on x's device and dtype (measured choices)."""
    if x.is_cuda and not torch.is_autocast_enabled("cuda") and x.dtype == torch.float32 \
            and positions <= CUDA_FP32_EXPLICIT_MAX_POSITIONS:
        return "explicit"
    return "fused"  # CPU: as fast or faster down to 4x4 maps (benchmarks/attention.py --small)


class SelfAttention(nn.Module):
    """Self-attention over all positions of a feature map (SAGAN, after Non-local networks).

    y = x + gamma * out(v softmax(q^T k)^T), with gamma initialised to 0 so the block starts as
    an identity and the network learns how much non-local evidence to use.

    variant="seed": value has C channels, no pooling, no output conv (the popular PyTorch port).
    variant="paper": value has C/2 channels, key and value are 2x2 max-pooled, 1x1 output conv
    (the official implementation; 4x less attention work).
    """

    def __init__(self, channels: int, variant: str = "seed", spectral_norm: bool = True, *, init: str = "orthogonal"):
        super().__init__()
        if variant not in ("seed", "paper"):
            raise ValueError(f"variant must be 'seed' or 'paper', got {variant!r}")
        if channels % 8:
            raise ValueError(f"channels must be a multiple of 8, got {channels}")
        self.variant = variant
        self.pooled = variant == "paper"
        self.value_channels = channels if variant == "seed" else channels // 2
        bias = variant == "seed"  # the port's 1x1 convs have biases, the official ones do not
        self.query = sn(nn.Conv2d(channels, channels // 8, 1, bias=bias), spectral_norm, init)
        self.key = sn(nn.Conv2d(channels, channels // 8, 1, bias=bias), spectral_norm, init)
        self.value = sn(nn.Conv2d(channels, self.value_channels, 1, bias=bias), spectral_norm, init)
        self.out = (
            sn(nn.Conv2d(self.value_channels, channels, 1, bias=False), spectral_norm, init) if self.pooled else None
        )
        self.gamma = nn.Parameter(torch.zeros(()))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.pooled:
            k, v = F.max_pool2d(k, 2), F.max_pool2d(v, 2)
        return q.flatten(2), k.flatten(2), v.flatten(2)

    def _finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        attended = attended.reshape(x.shape[0], self.value_channels, x.shape[2], x.shape[3])
        if self.out is not None:
            attended = self.out(attended)
        return x + self.gamma * attended

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        if attention_path(x, q.shape[2]) == "explicit":
            return self._finish(x, explicit_attention(q, k, v))
        return self._finish(x, fused_attention(q, k, v))

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The explicit formula, through the full N x M matrix: what the fused path is tested against."""
        _, _, v = self._qkv(x)
        return self._finish(x, v @ self.attention_weights(x).transpose(1, 2))

    def key_shape(self, height: int, width: int) -> tuple[int, int]:
        """The grid the attention rows live on (halved by the paper variant's pooling)."""
        return (height // 2, width // 2) if self.pooled else (height, width)

    def attention_weights(self, x: torch.Tensor, points: Sequence | torch.Tensor | None = None) -> torch.Tensor:
        """The explicit softmax rows A = softmax(q^T k): [B, N, M], or [B, P, M] for the given points.

        `points` are query positions on x's grid: flat indices (y * W + x) or (x, y) pairs.
        Rows sum to 1 over the M key positions (`key_shape` gives their grid).
        """
        q, k, _ = self._qkv(x)
        if points is not None:
            q = q[:, :, _flat_indices(points, x.shape[3]).to(q.device)]
        return torch.softmax(q.transpose(1, 2) @ k, dim=-1)


def _flat_indices(points: Sequence | torch.Tensor, width: int) -> torch.Tensor:
    if isinstance(points, torch.Tensor):
        return points.long().reshape(-1)
    return torch.tensor([point if isinstance(point, int) else point[1] * width + point[0] for point in points],
                        dtype=torch.long)


class ClassBatchNorm2d(nn.Module):
    """BatchNorm whose gain and bias are looked up per class (conditional BatchNorm).

    With num_classes == 0 it is an ordinary affine BatchNorm and ignores the labels.
    With cond_dim > 0 (BigGAN) the gain and bias are linear maps of a conditioning vector c (the shared class
    embedding, with a chunk of z under hierarchical_z): h * (1 + gain(c)) + bias(c), spectrally normalised
    when `use_sn`; forward then takes c in place of labels.
    """

    def __init__(self, channels: int, num_classes: int = 0, eps: float = 1e-5, *, cond_dim: int = 0,
                 use_sn: bool = True, init: str = "orthogonal"):
        super().__init__()
        self.linear = cond_dim > 0
        self.bn = nn.BatchNorm2d(channels, eps=eps, affine=num_classes == 0 and not self.linear)
        if self.linear:
            self.gain = sn(nn.Linear(cond_dim, channels, bias=False), use_sn, init)
            self.bias = sn(nn.Linear(cond_dim, channels, bias=False), use_sn, init)
        elif num_classes:
            self.gain = nn.Embedding(num_classes, channels)
            self.bias = nn.Embedding(num_classes, channels)
            nn.init.ones_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)
        else:
            self.gain = self.bias = None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.bn(x)
        if self.gain is None:
            return h
        if self.linear:
            return h * (1 + self.gain(y))[:, :, None, None] + self.bias(y)[:, :, None, None]
        return h * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class DCGANUpBlock(nn.Module):
    """Transposed conv (x2) -> BatchNorm -> ReLU: the popular port's generator layer."""

    def __init__(self, cin: int, cout: int, num_classes: int, use_sn: bool, init: str, *, stem: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        conv = nn.ConvTranspose2d(cin, cout, 4) if stem else nn.ConvTranspose2d(cin, cout, 4, 2, 1)
        self.conv = sn(conv, use_sn, init)
        self.bn = ClassBatchNorm2d(cout, num_classes, eps)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x), y))


class DCGANDownBlock(nn.Module):
    """Strided conv (/2) -> LeakyReLU(0.1): the popular port's discriminator layer (no BatchNorm)."""

    def __init__(self, cin: int, cout: int, use_sn: bool, init: str):
        super().__init__()
        self.conv = sn(nn.Conv2d(cin, cout, 4, 2, 1), use_sn, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), 0.1)


class ResUpBlock(nn.Module):
    """BN-ReLU-up-conv3-BN-ReLU-conv3 plus an upsampled 1x1 shortcut (the paper's ImageNet G block)."""

    def __init__(self, cin: int, cout: int, num_classes: int, use_sn: bool, init: str, *, eps: float = 1e-5,
                 cond_dim: int = 0):
        super().__init__()
        self.bn1 = ClassBatchNorm2d(cin, num_classes, eps, cond_dim=cond_dim, use_sn=use_sn, init=init)
        self.conv1 = sn(nn.Conv2d(cin, cout, 3, padding=1), use_sn, init)
        self.bn2 = ClassBatchNorm2d(cout, num_classes, eps, cond_dim=cond_dim, use_sn=use_sn, init=init)
        self.conv2 = sn(nn.Conv2d(cout, cout, 3, padding=1), use_sn, init)
        self.shortcut = sn(nn.Conv2d(cin, cout, 1), use_sn, init)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResDownBlock(nn.Module):
    """(ReLU)-conv3-ReLU-conv3-avgpool plus a 1x1 shortcut; the first block skips the leading ReLU
    so the raw image is not clipped. `shortcut_relu`: the shortcut of a block after the first sees relu(x), not
    x (StudioGAN's in-place ReLU)."""

    def __init__(self, cin: int, cout: int, use_sn: bool, init: str, *, first: bool = False, down: bool = True,
                 shortcut_relu: bool = False):
        super().__init__()
        self.first, self.down = first, down
        self.shortcut_relu = shortcut_relu and not first
        self.conv1 = sn(nn.Conv2d(cin, cout, 3, padding=1), use_sn, init)
        self.conv2 = sn(nn.Conv2d(cout, cout, 3, padding=1), use_sn, init)
        self.shortcut = sn(nn.Conv2d(cin, cout, 1), use_sn, init) if (cin != cout or down) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(activated)))
        if self.shortcut_relu:
            x = activated
        if self.down:
            h = F.avg_pool2d(h, 2)
        # a 1x1 conv commutes with 2x2 average pooling, so pool first: 4x fewer shortcut FLOPs, same result
        shortcut = F.avg_pool2d(x, 2) if self.down else x
        if self.shortcut is not None:
            shortcut = self.shortcut(shortcut)
        return h + shortcut
