"""Untrusted files for import-studiogan and import-biggan (a review's findings): tensors that are not plain dense
numbers, expanded tensors that make a tiny file describe a huge model, scalars of the wrong shape, a malformed
--config, and a D layout too long to build. Each is one UserError, before any model is built."""

from __future__ import annotations

import pytest
import torch

from sagan_cli.config import ModelConfig
from sagan_cli.errors import UserError
from sagan_cli.interchange import biggan, studiogan

HOSTILE = {
    "expanded": torch.zeros(1).expand(16384, 16384, 3, 3),  # 4 bytes on disk, 9.7 GB as a model layer
    "sparse": torch.eye(4).to_sparse(),
    "complex": torch.zeros(4, dtype=torch.complex64),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
@pytest.mark.parametrize("load, wrap", [(studiogan.load_studiogan_state, True), (biggan.load_biggan_state, False)])
def test_tensors_that_are_not_plain_numbers_are_refused(tmp_path, kind, load, wrap):
    state = {"linear0.weight_orig": HOSTILE[kind], "linear0.bias": torch.zeros(4)}
    path = tmp_path / "G.pth"
    torch.save({"state_dict": state} if wrap else state, path)
    with pytest.raises(UserError, match="linear0.weight_orig (is not a plain dense real tensor|holds fewer numbers)"):
        load(path, "--g")


@pytest.mark.parametrize("reader_class", [studiogan._Reader, biggan._Reader])
def test_a_scalar_of_the_wrong_shape_is_one_error(reader_class):
    reader = reader_class({"attn.gamma": torch.zeros(3), "ok.gamma": torch.zeros(1)}, "--g")
    assert reader.scalar("ok.gamma").shape == ()
    with pytest.raises(UserError, match=r"attn.gamma has shape \[3\], expected one number"):
        reader.scalar("attn.gamma")


@pytest.mark.parametrize("text, key", [("MODEL:\n  attn_g_loc: 2\n", "attn_g_loc"),
                                       ("MODEL:\n  attn_d_loc: [1, a]\n", "attn_d_loc"),
                                       ("DATA:\n  img_size: '32'\n", "img_size")])
def test_a_malformed_studiogan_config_is_one_error(tmp_path, text, key):
    path = tmp_path / "SAGAN.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=f"{key} must be"):
        studiogan._config_file(path)


def test_a_d_layout_too_long_to_build_is_refused():
    """[32] * 2000 + [16, 8, 4] kept or halved the size at each block: it built 2003 blocks (minutes, gigabytes)."""
    with pytest.raises(UserError, match="model.d_block_sizes"):
        ModelConfig.from_dict({"arch": "resnet", "resolution": 64, "d_block_sizes": [32] * 2000 + [16, 8, 4]})
    ModelConfig.from_dict({"arch": "resnet", "resolution": 64, "d_block_sizes": [32, 16, 8, 4, 4]})  # a real one
