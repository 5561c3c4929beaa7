"""Attention distance and entropy (attention_stats.py): known attention rows against a direct computation, and
the probe that training runs at each log step leaves the networks and the RNG exactly as it found them."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sagan_cli.config import recipe_from_dict
from sagan_cli.data.datasets import build_dataset
from sagan_cli.inspection.attention_stats import AttentionProbe, layer_stats, query_grid
from sagan_cli.model.layers import SelfAttention
from sagan_cli.model.models import attention_layers, build_models


def _set_weights(layer: SelfAttention, query: torch.Tensor, key: torch.Tensor) -> None:
    """1x1 conv weights [out, in] for q and k; biases zero (plain convs: the layer is built without spectral norm)."""
    with torch.no_grad():
        for conv, weight in ((layer.query, query), (layer.key, key)):
            conv.weight.copy_(weight[:, :, None, None])
            if conv.bias is not None:
                conv.bias.zero_()


def _query_cells(size: int) -> list[tuple[int, int]]:
    return [(x, y) for y in (1, 3, 5, 7) for x in (1, 3, 5, 7)] if size == 8 else []


def test_query_grid_is_a_spread_four_by_four_grid_or_every_cell():
    assert query_grid(8, 8).tolist() == [list(cell) for cell in _query_cells(8)]
    assert query_grid(2, 2).tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]  # a map smaller than the grid: every cell


@pytest.mark.parametrize("variant", ["seed", "paper"])
def test_equal_scores_give_exactly_the_uniform_reference(variant: str):
    """q = 0 makes every score 0: uniform rows, whose distance and entropy are the reference's."""
    torch.manual_seed(0)
    layer = SelfAttention(64, variant, spectral_norm=False)
    _set_weights(layer, torch.zeros(8, 64), torch.randn(8, 64))
    with torch.no_grad():
        stats = layer_stats(layer, torch.randn(2, 64, 8, 8))
    # keys: every map pixel, or (paper) the centres of the 2x2 pooled cells, in map pixels
    keys = [(x, y) for y in range(8) for x in range(8)] if variant == "seed" else \
        [(2 * x + 0.5, 2 * y + 0.5) for y in range(4) for x in range(4)]
    expected = sum(math.hypot(kx - qx, ky - qy) for qx, qy in _query_cells(8) for kx, ky in keys) / (16 * len(keys))
    assert stats.uniform_distance == pytest.approx(expected, rel=1e-12)
    assert stats.uniform_entropy == pytest.approx(math.log(len(keys)), rel=1e-12)
    assert stats.distance == pytest.approx(expected, rel=1e-6)
    assert stats.entropy == pytest.approx(math.log(len(keys)), rel=1e-6)


def _one_hot_positions(size: int, channels: int) -> torch.Tensor:
    """x [1, C, S, S] whose channel i is 1 at flat position i only."""
    x = torch.zeros(1, channels, size * size)
    x[0, torch.arange(size * size), torch.arange(size * size)] = 1
    return x.reshape(1, channels, size, size)


def test_attention_on_the_query_itself_has_zero_distance_and_entropy():
    """q_i = 60 e_i, k_j = e_j: score 60 on the query's own pixel, 0 elsewhere; rows are one-hot to ~1e-24."""
    layer = SelfAttention(128, "seed", spectral_norm=False)  # q, k: 16 channels, one per pixel of a 4x4 map
    eye = torch.eye(16, 128)
    _set_weights(layer, 60 * eye, eye)
    with torch.no_grad():
        stats = layer_stats(layer, _one_hot_positions(4, 128))
    assert stats.distance < 1e-20 and stats.entropy < 1e-20
    assert stats.uniform_entropy == pytest.approx(math.log(16))


def test_attention_on_one_corner_reaches_each_query_to_that_corner():
    """Every query attends to pixel (0, 0) only: the distance is the mean of |query - (0, 0)|."""
    layer = SelfAttention(64, "seed", spectral_norm=False)
    x = torch.zeros(1, 64, 8, 8)
    x[0, 0] = 1  # a constant channel ...
    x[0, 1, 0, 0] = 1  # ... and one lit only at the corner
    query, key = torch.zeros(8, 64), torch.zeros(8, 64)
    query[0, 0], key[0, 1] = 80, 1  # score 80 for the corner key, 0 for every other
    _set_weights(layer, query, key)
    with torch.no_grad():
        stats = layer_stats(layer, x)
    expected = sum(math.hypot(qx, qy) for qx, qy in _query_cells(8)) / 16
    assert stats.distance == pytest.approx(expected, abs=1e-9)
    assert stats.entropy < 1e-20


def _tiny(**model) -> dict:
    return {"data": {"kind": "synthetic", "synthetic_size": 16},
            "model": {"resolution": 32, "g_ch": 16, "d_ch": 16, "z_dim": 16, **model},
            "train": {"batch_size": 4}}


@pytest.mark.parametrize("model", [
    {"arch": "dcgan", "g_attention": [16], "d_attention": [8]},
    {"arch": "resnet", "attention": "paper", "num_classes": 3, "g_attention": [16, 8],
     "d_attention": [16]},
])
def test_probe_logs_every_layer_and_changes_nothing(model: dict):
    recipe = recipe_from_dict(_tiny(**model))
    generator, discriminator = build_models(recipe.model)
    discriminator.eval()  # the probe restores each network's own mode
    dataset = build_dataset(recipe.data, 32, recipe.model.num_classes, recipe.model.channels)
    before = [copy.deepcopy(net.state_dict()) for net in (generator, discriminator)]
    rng = torch.get_rng_state()
    stats = AttentionProbe(recipe, generator, discriminator, dataset).measure()
    assert torch.equal(torch.get_rng_state(), rng)
    for net, saved in zip((generator, discriminator), before, strict=True):
        state = net.state_dict()
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert generator.training and not discriminator.training
    layers = {f"g.{n}" for n in attention_layers(generator)} | {f"d.{n}" for n in attention_layers(discriminator)}
    assert set(stats) == {"attn_distance", "attn_entropy", "attn_distance_uniform", "attn_entropy_uniform"}
    for values in stats.values():
        assert set(values) == layers and all(math.isfinite(v) for v in values.values())
    for name in layers:  # softmax rows never reach further on average than the farthest key, nor exceed log K
        assert 0 < stats["attn_entropy"][name] <= stats["attn_entropy_uniform"][name] + 1e-9
    # the paper variant's pooled keys: a 16x16 map has 8x8 keys
    if model.get("attention") == "paper":
        assert stats["attn_entropy_uniform"]["d.attention.16"] == pytest.approx(math.log(64))


def test_no_attention_no_keys():
    recipe = recipe_from_dict(_tiny(g_attention=[], d_attention=[]))
    generator, discriminator = build_models(recipe.model)
    dataset = build_dataset(recipe.data, 32, 0, 3)
    assert AttentionProbe(recipe, generator, discriminator, dataset).measure() == {}
