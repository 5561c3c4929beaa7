"""`sagan export`: a generator as ONNX or TorchScript for serving, checked against the original right away.

Spectral norm is folded first: on a copy, every parametrisation is removed with its eval-mode value
(weight / sigma from the stored singular vectors, no power iteration), so the exported graph holds
plain weights and computes exactly what `sagan sample` does. BatchNorm uses its running statistics.
Inputs: z [B, z_dim] float32 (and y [B] int64 for a class-conditional model); output: images
[B, C, R, R] in [-1, 1] (C = 1 for a grayscale model, else 3). The batch dimension is dynamic; the check
runs at the batch size traced AND at another one, so a graph that baked the batch size in is caught.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from sagan_cli.errors import UserError, check_writable
from sagan_cli.interchange.checkpoint import load_model
from sagan_cli.model.generation import make_labels, make_noise

FORMATS = ("onnx", "torchscript")
TRACE_BATCH = 2  # the batch size the graph is traced (exported) at
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
OPSET = 17


class ConditionalGenerator(nn.Module):
    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.generator(z, y)


class UnconditionalGenerator(nn.Module):
    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)


def fold_parametrizations(model: nn.Module) -> nn.Module:
    """Bake every parametrisation (spectral norm) into plain weights, in eval mode, in place.

    In place on a model of its own: a deepcopy would share the parametrised classes torch creates,
    and removing the parametrisation from the copy would break the original.
    """
    plain = model.eval()
    for module in list(plain.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return plain


def _inputs(config, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    z = make_noise(n, config.z_dim, seed=seed)
    labels = make_labels(n, config.num_classes, None)
    return (z,) if labels is None else (z, labels)


def _export_onnx(module: nn.Module, example: tuple, out: Path) -> None:
    names = ["z", "y"][: len(example)]
    axes = {name: {0: "batch"} for name in names} | {"images": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = dict(input_names=names, output_names=["images"], dynamic_axes=axes, opset_version=OPSET)
        try:  # the TorchScript-based exporter: dynamic batch through dynamic_axes, no onnxscript needed
            torch.onnx.export(module, example, str(out), dynamo=False, **options)
        except TypeError:  # torch < 2.5 has no `dynamo` argument (and only that exporter)
            torch.onnx.export(module, example, str(out), **options)


def _run_onnx(path: Path, inputs: tuple) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError:
        raise UserError("checking an ONNX export needs onnxruntime: pip install 'sagan-cli[export]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {spec.name: tensor.numpy() for spec, tensor in zip(session.get_inputs(), inputs, strict=True)}
    return torch.from_numpy(session.run(None, feed)[0])


def _export_torchscript(module: nn.Module, example: tuple, out: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(out))


def _run_torchscript(path: Path, inputs: tuple) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return loaded(*inputs)


def check_batch_sizes(check_samples: int) -> list[int]:
    """The batch sizes an export is checked at: the traced one and `check_samples` (one more when equal)."""
    return [TRACE_BATCH, check_samples if check_samples != TRACE_BATCH else TRACE_BATCH + 1]


def export_generator(ckpt: str | Path, fmt: str = "onnx", out: str | Path | None = None, *,
                     check_samples: int = 5, seed: int = 0) -> tuple[Path, float]:
    """Export the generator of `ckpt`; return the file and the largest |difference| to the original model."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if check_samples <= 0:
        raise UserError(f"--check must be a positive number of images, got {check_samples}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (torch's exporter needs it)
        except ImportError:
            raise UserError("ONNX export needs the onnx package: pip install 'sagan-cli[export]'") from None
    ckpt = Path(ckpt)
    out = Path(out) if out is not None else ckpt.with_suffix(SUFFIX[fmt])
    check_writable(out, "--out")
    generator, info = load_model(ckpt, expect="generator", device="cpu")
    config = info.config
    plain = fold_parametrizations(load_model(ckpt, expect="generator", device="cpu")[0])
    wrapper = (ConditionalGenerator if config.num_classes else UnconditionalGenerator)(plain).eval()
    example = _inputs(config, TRACE_BATCH, seed=seed + 1)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        (_export_onnx if fmt == "onnx" else _export_torchscript)(wrapper, example, tmp)
        difference = 0.0
        for batch in check_batch_sizes(check_samples):
            check = _inputs(config, batch, seed=seed)
            with torch.no_grad():
                expected = generator(*check)  # the original, spectral norm still parametrised
            got = (_run_onnx if fmt == "onnx" else _run_torchscript)(tmp, check)
            if got.shape != expected.shape:
                raise RuntimeError(f"the exported model gave shape {tuple(got.shape)} at batch size {batch}, "
                                   f"expected {tuple(expected.shape)}")
            difference = max(difference, float((got - expected).abs().max()))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, difference
