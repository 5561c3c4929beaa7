"""Generator and Discriminator: shapes, labels, attention placement, spectral norm, init."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sagan_cli.config import ModelConfig
from sagan_cli.errors import UserError
from sagan_cli.model.models import Discriminator, Generator, attention_layers, build_models, gammas


def tiny(**kw) -> ModelConfig:
    base = dict(resolution=32, z_dim=16, g_ch=8, d_ch=8, g_attention=[8], d_attention=[8])
    return ModelConfig(**{**base, **kw})


def as_matrix(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The 2-D matrix spectral_norm normalises: output channels first (dim=1 for ConvTranspose2d)."""
    if isinstance(module, nn.ConvTranspose2d):
        weight = weight.transpose(0, 1)
    return weight.reshape(weight.shape[0], -1)


def sn_norms(model: nn.Module) -> dict[str, float]:
    """Largest singular value of every spectrally normalised weight (eval: no power iteration)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        norms = {
            name: torch.linalg.matrix_norm(as_matrix(m, m.weight), ord=2).item()
            for name, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight")
        }
    model.train(was_training)
    return norms


def layers_with_weights(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def run(model, labels=None, batch=2):
    cfg = model.config
    if isinstance(model, Generator):
        return model(torch.randn(batch, cfg.z_dim), labels)
    return model(torch.randn(batch, 3, cfg.resolution, cfg.resolution), labels)


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_shapes(arch, resolution, num_classes):
    torch.manual_seed(0)
    g, d = build_models(tiny(arch=arch, resolution=resolution, num_classes=num_classes))
    labels = torch.tensor([1, 7]) if num_classes else None
    with torch.no_grad():
        images = run(g, labels)
        scores = d(images, labels)
    assert images.shape == (2, 3, resolution, resolution)
    assert images.std() > 0
    # the output layer ends in tanh: every pixel is tanh of the output conv (hook), so it lies in [-1, 1]
    seen = {}
    handle = g.to_rgb.register_forward_hook(lambda module, args, out: seen.setdefault("pre", out))
    with torch.no_grad():
        again = run(g, labels)
    handle.remove()
    assert torch.equal(again, torch.tanh(seen["pre"]))
    assert scores.shape == (2,) and torch.isfinite(scores).all()


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_labels_change_conditional_outputs(arch):
    torch.manual_seed(0)
    g, d = build_models(tiny(arch=arch, num_classes=4))
    # class-conditional BatchNorm starts identical for every class (gain 1, bias 0), as training would
    # leave it only by accident: give each class its own gains and biases first
    for m in g.modules():
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 1.0, 0.5)
    g.eval(), d.eval()
    z, x = torch.randn(2, 16), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(g(z, torch.tensor([0, 0])), g(z, torch.tensor([3, 3])), atol=1e-4)
        assert not torch.allclose(d(x, torch.tensor([0, 0])), d(x, torch.tensor([3, 3])), atol=1e-4)
        assert torch.equal(g(z, torch.tensor([1, 1])), g(z, torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="labels"):
        g(z)
    with pytest.raises(ValueError, match="labels"):
        d(x)


def test_unconditional_models_need_no_labels():
    g, d = build_models(tiny())
    with torch.no_grad():
        assert d(g(torch.randn(2, 16))).shape == (2,)


def record_attention_sizes(model: nn.Module) -> list[int]:
    seen = []
    hooks = [m.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].shape[-1]))
             for m in attention_layers(model).values()]
    with torch.no_grad():
        run(model)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize(
    "arch, resolution, g_att, d_att",
    [("dcgan", 64, [32], [32]), ("dcgan", 64, [4, 16], [8, 4]), ("resnet", 32, [8, 32], [16]),
     ("resnet", 64, [], [4]), ("resnet", 32, [16], [16, 8, 4])],
)
def test_attention_sits_exactly_at_the_listed_sizes(arch, resolution, g_att, d_att):
    g, d = build_models(tiny(arch=arch, resolution=resolution, g_attention=g_att, d_attention=d_att))
    assert sorted(record_attention_sizes(g)) == sorted(g_att)
    # each size once, even at 4x4 where the resnet D has two blocks
    assert sorted(record_attention_sizes(d)) == sorted(d_att)
    assert set(gammas(g)) == {f"attention.{s}" for s in g_att}
    for size in g_att:
        assert attention_layers(g)[f"attention.{size}"].value_channels > 0


@pytest.mark.parametrize(
    "kw, key",
    [(dict(g_attention=[3]), "model.g_attention"), (dict(g_attention=[32]), "model.g_attention"),
     (dict(d_attention=[32]), "model.d_attention"), (dict(arch="resnet", g_attention=[4]), "model.g_attention"),
     (dict(resolution=48), "model.resolution"), (dict(g_ch=12), "model.g_ch"), (dict(attention="both"), "model.attention")],
)
def test_invalid_model_config_raises_naming_the_key(kw, key):
    with pytest.raises(UserError, match=key):
        Generator(tiny(**kw))
    with pytest.raises(UserError, match=key):
        Discriminator(tiny(**kw))


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_spectral_norm_bounds_every_weight_and_power_iteration_tracks_changes(arch):
    torch.manual_seed(0)
    g, d = build_models(tiny(arch=arch, num_classes=3, init="normal"))
    for model in (g, d):
        # every conv/linear is normalised, attention included, except the last layer
        last = "to_rgb" if model is g else "head"
        expected = {name for name in layers_with_weights(model) if name != last}
        if model is d:
            expected.add("embed")  # the projection embedding
        assert set(sn_norms(model)) == expected
        assert any(name.startswith("attention.") for name in expected)
        # push each weight's top singular direction away from the stored u/v: a rank-one spike
        with torch.no_grad():
            for m in model.modules():
                if parametrize.is_parametrized(m, "weight"):
                    w = m.parametrizations.weight.original
                    mat = as_matrix(m, w)
                    a, b = torch.randn(mat.shape[0]), torch.randn(mat.shape[1])
                    spike = 3 * torch.linalg.matrix_norm(mat, ord=2) * torch.outer(a / a.norm(), b / b.norm())
                    w += (spike.reshape(w.transpose(0, 1).shape).transpose(0, 1) if isinstance(m, nn.ConvTranspose2d)
                          else spike.reshape(w.shape))
        assert min(sn_norms(model).values()) > 1.5  # the stored u/v miss the new top direction
        model.train()
        for _ in range(8):  # each train-mode forward runs one power iteration per layer
            with torch.no_grad():
                run(model, torch.tensor([0, 2]))
        norms = sn_norms(model)
        assert all(abs(n - 1) < 1e-3 for n in norms.values()), norms


def test_spectral_norm_options():
    g, d = build_models(tiny(sn_last_layer=True))
    assert "to_rgb" in sn_norms(g) and "head" in sn_norms(d)
    g = Generator(tiny(g_spectral_norm=False))
    assert sn_norms(g) == {}
    d = Discriminator(tiny(d_spectral_norm=False, arch="resnet"))
    assert sn_norms(d) == {}


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_batchnorm_in_g_only(arch):
    g, d = build_models(tiny(arch=arch))
    assert any(isinstance(m, nn.BatchNorm2d) for m in g.modules())
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) for m in d.modules())


def test_orthogonal_init_and_gammas():
    torch.manual_seed(0)
    g, d = build_models(tiny(arch="resnet", init="orthogonal"))
    for model in (g, d):
        for name, m in layers_with_weights(model).items():
            w = m.weight if not parametrize.is_parametrized(m, "weight") else m.parametrizations.weight.original
            w = w.detach().reshape(w.shape[0], -1)  # nn.init.orthogonal_ flattens from dim 0
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-4), name
    assert gammas(g) == {"attention.8": 0.0} and gammas(d) == {"attention.8": 0.0}
    with torch.no_grad():
        attention_layers(d)["attention.8"].gamma.fill_(0.25)
    assert gammas(d) == {"attention.8": 0.25}
    w = Generator(tiny(init="normal")).blocks[1].conv.parametrizations.weight.original
    assert not torch.allclose(w.flatten(1) @ w.flatten(1).T, torch.eye(w.shape[0]), atol=0.1)
