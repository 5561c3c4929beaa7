"""report, interpolate, import-port and export fed bad input: exit 2, one `error:` line, no traceback.

Runs the real entry point in this process (see tests/helpers.py, `run_main`, for the pattern).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from helpers import run_main

from sagan_cli.config import ModelConfig
from sagan_cli.interchange.checkpoint import save_model
from sagan_cli.model.models import Discriminator, Generator

TINY = dict(resolution=32, g_ch=16, d_ch=16, z_dim=16, g_attention=[16], d_attention=[8])


class NotAStateDict:  # a pickled object: loading it needs weights_only=False
    pass


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("errors13")
    p = {"root": root}
    p["g"] = save_model(root / "g.safetensors", Generator(ModelConfig(**TINY)), step=1)
    p["d"] = save_model(root / "d.safetensors", Discriminator(ModelConfig(**TINY)), step=1)
    p["garbage"] = root / "garbage.pth"
    p["garbage"].write_bytes(b"\x00not a checkpoint" * 10)
    p["object"] = root / "object.pth"
    torch.save({"model": NotAStateDict()}, p["object"])
    p["raw_pickle"] = root / "raw.pth"
    with p["raw_pickle"].open("wb") as f:
        pickle.dump({"model": NotAStateDict()}, f, protocol=4)
    p["list"] = root / "list.pth"
    torch.save([torch.zeros(2)], p["list"])
    p["other_model"] = root / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.bias": torch.zeros(10)}, p["other_model"])
    p["port_d"] = root / "port_D.pth"  # the port's discriminator layout (a few keys suffice to be recognised)
    torch.save({"l1.0.module.weight_bar": torch.zeros(16, 3, 4, 4), "l1.0.module.weight_u": torch.zeros(16)},
               p["port_d"])
    p["port_g_32"] = root / "port_G32.pth"  # the port's generator without l4 (imsize 32)
    torch.save({"l1.0.module.weight_bar": torch.zeros(16, 64, 4, 4), "l1.1.running_mean": torch.zeros(64)},
               p["port_g_32"])
    p["empty_dir"] = root / "not-a-run"
    p["empty_dir"].mkdir()
    (p["empty_dir"] / "notes.txt").write_text("hello")
    p["file"] = root / "existing.txt"
    p["file"].write_text("keep me\n")
    return p


CASES = {
    # report
    "report_missing": (["report", "{root}/nope"], "does not exist"),
    "report_not_a_run": (["report", "{empty_dir}"], "is not a sagan run"),
    "report_file": (["report", "{file}"], "is a file, not a run directory"),
    "report_out_folder": (["report", "{root}", "--out", "{empty_dir}"], "is a folder"),
    # interpolate
    "interp_missing": (["interpolate", "--ckpt", "{root}/none.safetensors"], "does not exist"),
    "interp_d": (["interpolate", "--ckpt", "{d}", "--out", "{root}/i"], "holds a discriminator"),
    "interp_mode": (["interpolate", "--ckpt", "{g}", "--mode", "cubic", "--out", "{root}/i"], "--mode must be one of"),
    "interp_seeds": (["interpolate", "--ckpt", "{g}", "--seeds", "1,x", "--out", "{root}/i"], "comma-separated integers"),
    "interp_one_seed": (["interpolate", "--ckpt", "{g}", "--seeds", "4", "--out", "{root}/i"], "at least two"),
    "interp_steps": (["interpolate", "--ckpt", "{g}", "--steps", "1", "--out", "{root}/i"], "--steps must be >= 2"),
    "interp_classes_uncond": (["interpolate", "--ckpt", "{g}", "--classes", "0,1", "--out", "{root}/i"],
                              "class-conditional"),
    "interp_animation": (["interpolate", "--ckpt", "{g}", "--animation", "avi", "--out", "{root}/i"],
                         "--animation must be one of"),
    "interp_out_file": (["interpolate", "--ckpt", "{g}", "--out", "{file}"], "is a file"),
    # import-port
    "port_nothing": (["import-port", "--out", "{root}/p"], "--g G.pth and/or --d"),
    "port_missing": (["import-port", "--g", "{root}/G.pth", "--out", "{root}/p"], "does not exist"),
    "port_folder": (["import-port", "--g", "{empty_dir}", "--out", "{root}/p"], "is a folder"),
    "port_garbage": (["import-port", "--g", "{garbage}", "--out", "{root}/p"], "not a PyTorch checkpoint"),
    "port_object": (["import-port", "--g", "{object}", "--out", "{root}/p"], "weights_only=False"),
    "port_raw_pickle": (["import-port", "--g", "{raw_pickle}", "--out", "{root}/p"], "not a PyTorch checkpoint"),
    "port_list": (["import-port", "--g", "{list}", "--out", "{root}/p"], "not a state dict"),
    "port_other_model": (["import-port", "--g", "{other_model}", "--out", "{root}/p"], "not the port's generator"),
    "port_swapped": (["import-port", "--g", "{port_d}", "--out", "{root}/p"], "swap --g and --d"),
    "port_imsize32": (["import-port", "--g", "{port_g_32}", "--out", "{root}/p"], "only runs at imsize 64"),
    "port_safetensors": (["import-port", "--g", "{g}", "--out", "{root}/p"], "not the port's generator"),
    # export
    "export_missing": (["export", "--ckpt", "{root}/none.safetensors"], "does not exist"),
    "export_d": (["export", "--ckpt", "{d}", "--format", "torchscript", "--out", "{root}/x.pt"], "holds a discriminator"),
    "export_format": (["export", "--ckpt", "{g}", "--format", "tflite"], "--format must be one of"),
    "export_out_folder": (["export", "--ckpt", "{g}", "--format", "torchscript", "--out", "{empty_dir}"], "is a folder"),
    "export_check": (["export", "--ckpt", "{g}", "--check", "0"], "--check must be a positive"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error(name: str, paths: dict[str, Path], capsys, monkeypatch):
    args, expected = CASES[name]
    filled = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    code, out, err = run_main(filled, capsys, monkeypatch)
    assert code == 2, (name, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in out + err
    assert expected in lines[0], lines[0]
    assert paths["file"].read_text() == "keep me\n"  # nothing already on disk is lost
    assert not (paths["root"] / "p" / "g.safetensors").exists()


@pytest.mark.parametrize("command", ["report", "interpolate", "import-port", "export"])
def test_help_shows_defaults_and_an_example(command: str, capsys, monkeypatch):
    code, out, _ = run_main([command, "--help"], capsys, monkeypatch)
    assert code == 0 and "Example: sagan " + command in out
    assert ("required" if command == "import-port" else "default") in out  # import-port: every option is a path
