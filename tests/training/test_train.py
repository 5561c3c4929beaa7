"""The training loop for real, on tiny models: losses, bf16, checkpoints, exact resume, 2 processes, Ctrl-C."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, tiny_recipe, weights
from safetensors.torch import load_file

from sagan_cli.errors import UserError
from sagan_cli.interchange.checkpoint import load_model, read_info
from sagan_cli.model.models import Discriminator, Generator, gammas
from sagan_cli.training.batches import batch_indices
from sagan_cli.training.loop import run_training
from sagan_cli.training.nets import EMA
from sagan_cli.training.state import latest_state


def test_batch_order_is_a_function_of_position():
    straight = batch_indices(10, 4, seed=3, start_batch=0, rank=0, world=1)
    first = [next(straight) for _ in range(6)]
    resumed = batch_indices(10, 4, seed=3, start_batch=3, rank=0, world=1)
    assert [next(resumed) for _ in range(3)] == first[3:]
    # every epoch is a permutation of the dataset
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    # two ranks split each global batch without overlap
    r0 = next(batch_indices(10, 4, seed=3, start_batch=0, rank=0, world=2))
    r1 = next(batch_indices(10, 4, seed=3, start_batch=0, rank=1, world=2))
    assert not set(r0) & set(r1)


@pytest.mark.parametrize("loss", ["hinge", "nonsaturating", "wgan-gp"])
def test_each_loss_trains_and_writes_the_run_directory(tmp_path, loss):
    recipe = tiny_recipe(train__loss=loss, train__steps=2)
    torch.manual_seed(recipe.train.seed)  # the initial weights training starts from (it seeds the same way)
    initial_g, initial_d = Generator(recipe.model).state_dict(), Discriminator(recipe.model).state_dict()
    result = run_training(recipe, tmp_path / "run")
    run = tmp_path / "run"
    assert result.step == 2
    # both networks moved away from their initial weights, and stayed finite
    for initial, trained in ((initial_g, result.generator), (initial_d, result.discriminator)):
        moved = [k for k, v in trained.named_parameters() if not torch.equal(v.detach(), initial[k])]
        assert len(moved) >= len(list(trained.parameters())) // 2, moved
        assert all(torch.isfinite(v).all() for v in trained.parameters())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "loss_d" in r]
    assert [r["step"] for r in records] == [1, 2]
    # synthetic data: the structure checker scores the generator at every sample grid
    structure = [r for r in lines if "structure" in r]
    assert [r["step"] for r in structure] == [0, 2]
    assert 0 <= structure[-1]["structure"]["valid_fraction"] <= 1
    assert all(torch.isfinite(torch.tensor([r["loss_d"], r["loss_g"]])).all() for r in records)
    assert set(records[0]["gamma"]) == {"g.attention.16", "d.attention.8"}
    assert records[-1]["img_per_s"] > 0
    assert json.loads((run / "config.json").read_text())["train"]["loss"] == loss
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000000.png", "step-0000002.png"]
    assert latest_state(run / "state").name == "step-0000002"


def test_bf16_and_conditional_training_on_cpu(tmp_path):
    recipe = tiny_recipe(train__mixed_precision="bf16", model__num_classes=3, train__steps=2)
    dtypes = set()  # what the convolutions computed in while training: autocast must have run them in bf16
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: dtypes.add(out.dtype) if isinstance(module, torch.nn.Conv2d) and module.training else None)
    try:
        result = run_training(recipe, tmp_path / "run")
    finally:
        hook.remove()
    assert torch.bfloat16 in dtypes
    assert result.step == 2
    assert all(torch.isfinite(p).all() for p in result.generator.parameters())
    g, info = load_model(tmp_path / "run" / "g.safetensors", expect="generator")
    assert info.config.num_classes == 3
    z = torch.randn(2, 128)
    assert not torch.equal(g(z, torch.tensor([0, 0])), g(z, torch.tensor([1, 2])))


def test_checkpoint_metadata_round_trip(tmp_path):
    result = run_training(tiny_recipe(), tmp_path / "run")
    g_info = read_info(tmp_path / "run" / "g.safetensors")
    d_info = read_info(tmp_path / "run" / "d.safetensors")
    assert (g_info.kind, g_info.step, g_info.recipe, g_info.ema) == ("generator", 4, "tiny", True)
    assert (d_info.kind, d_info.step) == ("discriminator", 4)
    assert g_info.config == result.generator.config
    ema, _ = load_model(tmp_path / "run" / "g.safetensors")
    for name, tensor in result.ema.state_dict().items():
        assert torch.equal(ema.state_dict()[name], tensor), name
    # keep_checkpoints = 2: only the last two states remain
    assert sorted(p.name for p in (tmp_path / "run" / "state").iterdir()) == ["step-0000002", "step-0000004"]
    # the EMA's BatchNorm statistics are its own (standing statistics), not G's copied ones: every running mean
    # is the mean of that layer's input over the fixed re-estimation noise (batch-normalised, as in training),
    # measured here by forward hooks on a copy
    norms = {name: m for name, m in ema.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    raw = dict(result.generator.named_buffers())
    assert norms and all(not torch.equal(norm.running_mean, raw[f"{name}.running_mean"]) for name, norm in norms.items())
    probe, inputs = copy.deepcopy(ema), {name: [] for name in norms}
    for name, module in probe.named_modules():
        if name in norms:
            module.train()
            module.register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0].transpose(0, 1).flatten(1)))
    noise, batch = torch.Generator().manual_seed(0), tiny_recipe().train.batch_size
    with torch.no_grad():
        for _ in range(tiny_recipe().train.ema_standing_stats):
            probe(torch.randn(batch, g_info.config.z_dim, generator=noise))
    for name, norm in norms.items():
        torch.testing.assert_close(norm.running_mean, torch.cat(inputs[name], 1).mean(1), rtol=1e-4, atol=1e-5)


def test_resume_is_bit_exact(tmp_path):
    # hflip on: the augmentation's randomness must be restored too
    straight = weights(run_training(tiny_recipe(data__hflip=True), tmp_path / "a"))
    run_training(tiny_recipe(data__hflip=True, train__steps=2), tmp_path / "b")
    resumed = weights(run_training(tiny_recipe(data__hflip=True), tmp_path / "b", resume=True))
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss_d" in x] == [1, 2, 3, 4]


def test_a_half_written_state_is_ignored(tmp_path):
    run_training(tiny_recipe(train__steps=2), tmp_path / "run")
    state = tmp_path / "run" / "state"
    torn = state / ".tmp-step-0000003"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"torn")
    assert latest_state(state).name == "step-0000002"
    result = run_training(tiny_recipe(train__steps=3), tmp_path / "run", resume=True)
    assert result.step == 3


def test_resume_refuses_meaningless_changes(tmp_path):
    run_training(tiny_recipe(train__steps=2), tmp_path / "run")
    with pytest.raises(UserError, match="model.g_ch"):
        run_training(tiny_recipe(model__g_ch=24), tmp_path / "run", resume=True)
    with pytest.raises(UserError, match="--resume"):
        run_training(tiny_recipe(), tmp_path / "run")  # an existing run is never overwritten
    with pytest.raises(UserError, match="nothing to resume"):
        run_training(tiny_recipe(), tmp_path / "empty", resume=True)


def test_non_finite_losses_stop_with_the_last_good_checkpoint(tmp_path):
    # An absurd learning rate overflows the weights within a step or two.
    recipe = tiny_recipe(train__lr_d=1e38, train__lr_g=1e38, train__steps=50, train__max_bad_steps=3,
                         train__checkpoint_every=1)
    with pytest.raises(UserError, match="training diverged") as info:
        run_training(recipe, tmp_path / "run")
    # the first update overflowed the weights (with finite losses): nothing that was saved can be good
    assert "no checkpoint was written yet" in str(info.value)
    assert latest_state(tmp_path / "run" / "state") is None and not (tmp_path / "run" / "g.safetensors").exists()


CLI = [sys.executable, "-m", "sagan_cli"]


def write_recipe(path: Path, steps: int) -> Path:
    path.write_text(textwrap.dedent(f"""
        [data]
        kind = "synthetic"
        synthetic_size = 64
        [model]
        resolution = 32
        g_ch = 16
        d_ch = 16
        g_attention = [16]
        d_attention = [8]
        [train]
        steps = {steps}
        batch_size = 8
        log_every = 1
        checkpoint_every = 1000
        sample_every = 1000
    """))
    return path


def test_cli_dry_run_and_recipe_errors(tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", 3)
    out = subprocess.run([*CLI, "train", str(recipe), "--out", str(tmp_path / "run"), "--dry-run",
                          "--set", "train.steps=7"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "train.steps" in out.stdout and "7" in out.stdout
    assert not (tmp_path / "run").exists()
    for override, key in [("train.stepz=3", "train.stepz"), ('train.steps="x"', "train.steps"),
                          ("model.resolution=48", "model.resolution"), ("model.g_attention=[64]", "model.g_attention")]:
        bad = subprocess.run([*CLI, "train", str(recipe), "--set", override, "--dry-run"], capture_output=True, text=True)
        assert bad.returncode == 2, override
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0], bad.stderr


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", 100000)
    run = tmp_path / "run"
    proc = subprocess.Popen([*CLI, "train", str(recipe), "--out", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        log = run / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "interrupted" in stdout
    state = latest_state(run / "state")
    step = read_info(run / "g.safetensors").step
    assert state is not None and state.name == f"step-{step:07d}" and step >= 2


TWO_RANKS = """
import os, sys
from safetensors.torch import save_file
from sagan_cli.config import recipe_from_dict
from sagan_cli.training.loop import run_training
raw = {raw!r}
raw["train"]["steps"] = int(sys.argv[2])
raw["eval"] = {{"every": 2, "num_samples": 16, "metrics": ["structure"]}}  # rank 0 evaluates, rank 1 waits
result = run_training(recipe_from_dict(raw, name="ddp"), sys.argv[1], resume=sys.argv[3] == "resume")
rank = int(os.environ["RANK"])
tensors = {{f"g.{{k}}": v for k, v in result.generator.state_dict().items()}}
tensors.update({{f"d.{{k}}": v for k, v in result.discriminator.state_dict().items()}})
save_file({{k: v.detach().contiguous() for k, v in tensors.items()}}, f"{{sys.argv[1]}}.rank{{rank}}.safetensors")
"""


def two_ranks(script: Path, run: Path, steps: int, resume: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          str(script), str(run), str(steps), "resume" if resume else "new"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(f"step {steps}/{steps}") <= 1  # one progress bar
    return {r: load_file(f"{run}.rank{r}.safetensors") for r in (0, 1)}


@pytest.mark.processes
def test_two_processes_stay_in_sync_draw_their_own_noise_and_resume_exactly(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(TWO_RANKS.format(raw=TINY))
    straight = two_ranks(script, tmp_path / "straight", 4)
    r0, r1 = straight[0], straight[1]
    params = [k for k in r0 if "running_" not in k and "num_batches" not in k and not k.endswith(("_u", "_v"))]
    assert any(k.startswith("d.") for k in params) and r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in params)  # DDP keeps the weights identical
    # each rank drew its own noise: G's BatchNorm saw other fakes on each rank
    running = [k for k in r0 if k.startswith("g.") and "running_mean" in k]
    assert running and all(not torch.equal(r0[k], r1[k]) for k in running)
    # one log, one set of exports; each rank saved its own RNG state, nothing pickled
    run = tmp_path / "straight"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss_d" in x] == [1, 2, 3, 4]
    assert [x["step"] for x in lines if "eval" in x] == [2, 4]
    state = latest_state(run / "state")
    assert sorted(p.name for p in state.iterdir()) == ["models.safetensors", "optimizers.safetensors",
                                                       "progress.json", "rng-rank0.json", "rng-rank1.json"]
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "d.safetensors", "g.safetensors",
                                                     "metrics.jsonl", "samples", "state"]
    # two-process resume is exact: from the straight run's step-2 checkpoint (a launch costs ~20 s on 2 cores, so
    # the run is not trained to step 2 again; the state a run ends with is the one its checkpoint_every writes)
    halves = tmp_path / "halves"
    shutil.copytree(run, halves)
    shutil.rmtree(halves / "state" / "step-0000004")
    assert latest_state(halves / "state").name == "step-0000002"
    resumed = two_ranks(script, halves, 4, resume=True)
    for rank in (0, 1):
        assert [k for k in straight[rank] if not torch.equal(straight[rank][k], resumed[rank][k])] == []
    # and another number of processes is refused, naming it
    with pytest.raises(UserError, match="number of processes"):
        run_training(tiny_recipe(train__steps=6), tmp_path / "halves", resume=True)


@pytest.mark.processes
def test_a_failure_on_rank_0_alone_stops_every_rank_with_one_error_line(tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", 4)
    run = tmp_path / "run"
    run.mkdir()
    (run / "samples").write_text("a file where rank 0 writes its sample grids")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          "-m", "sagan_cli", "train", str(recipe), "--out", str(run)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sample grid" in errors[0] and "samples" in errors[0], out.stderr[-2000:]
    assert "sagan_cli/" not in out.stderr  # no traceback from our code (torchrun reports the exit code itself)


def test_evaluation_during_training_is_logged_and_leaves_training_unchanged(tmp_path):
    plain = weights(run_training(tiny_recipe(), tmp_path / "plain"))
    recipe = tiny_recipe(eval__every=2, eval__num_samples=16, eval__metrics=["structure"])
    evaluated = weights(run_training(recipe, tmp_path / "eval"))
    assert all(torch.equal(plain[k], evaluated[k]) for k in plain)  # evaluation draws from its own RNG
    lines = [json.loads(x) for x in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval" in x]
    assert [x["step"] for x in evals] == [2, 4]
    assert 0 <= evals[0]["eval"]["structure_valid_fraction"] <= 1


def test_missing_inception_weights_fail_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("SAGAN_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(UserError, match="Inception weights"):
        run_training(tiny_recipe(eval__every=2, eval__metrics=["fid"]), tmp_path / "run")
    assert not (tmp_path / "run" / "state").exists()


def test_resume_applies_new_learning_rates_and_refuses_to_shrink(tmp_path):
    run_training(tiny_recipe(train__steps=2), tmp_path / "run")
    with pytest.raises(UserError, match="train.steps"):
        run_training(tiny_recipe(train__steps=1), tmp_path / "run", resume=True)
    with pytest.raises(UserError, match="train.batch_size"):
        run_training(tiny_recipe(train__batch_size=4), tmp_path / "run", resume=True)
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text(log.read_text() + json.dumps({"step": 3, "loss_d": 0.0}) + "\n")  # logged, never checkpointed
    result = run_training(tiny_recipe(train__steps=3, train__lr_g=5e-5, train__lr_d=3e-4), tmp_path / "run", resume=True)
    assert result.step == 3
    records = [json.loads(x) for x in log.read_text().splitlines() if "loss_d" in x]
    assert [r["step"] for r in records] == [1, 2, 3]  # the stale step-3 line was dropped, the new one written once
    assert [(r["lr_g"], r["lr_d"]) for r in records] == [(1e-4, 4e-4), (1e-4, 4e-4), (5e-5, 3e-4)]


def test_a_skipped_non_finite_step_leaves_every_saved_model_finite(tmp_path):
    """Plant NaN in G's activations from the third step on: the error must name a state that samples finite images."""
    from safetensors.torch import load_file as load_tensors

    from sagan_cli.model.layers import DCGANUpBlock

    forwards = {"n": 0}

    def poison(module, args, out):
        if isinstance(module, DCGANUpBlock) and module.training and module.conv.in_channels == 128:  # G's stem
            forwards["n"] += 1
            if forwards["n"] > 2:  # one training forward of G per step (reuse_fakes)
                return out * float("nan")
        return None

    hook = torch.nn.modules.module.register_module_forward_hook(poison)
    try:
        with pytest.raises(UserError, match="non-finite losses for 3 consecutive steps") as info:
            run_training(tiny_recipe(train__steps=20, train__max_bad_steps=3, train__checkpoint_every=1),
                         tmp_path / "run")
    finally:
        hook.remove()
    named = latest_state(tmp_path / "run" / "state")
    assert str(named) in str(info.value)
    for name, tensor in load_tensors(str(named / "models.safetensors")).items():
        assert torch.isfinite(tensor).all(), name
    g, _ = load_model(tmp_path / "run" / "g.safetensors", expect="generator")
    assert all(torch.isfinite(b).all() for b in g.buffers())
    with torch.no_grad():
        images = g(torch.randn(8, g.config.z_dim))
    assert torch.isfinite(images).all() and images.std() > 0


def test_resume_survives_a_torn_log_line_and_never_unpickles(tmp_path):
    import pickle

    run = tmp_path / "run"
    run_training(tiny_recipe(train__steps=2), run)
    log = run / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "loss_d": 0.1')  # a crash mid-write
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this runs code: a hostile file in a shared run folder
        def __reduce__(self):
            return (Path.touch, (marker,))

    state = latest_state(run / "state")
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin"):
        (state / name).write_bytes(pickle.dumps(Payload()))
    result = run_training(tiny_recipe(train__steps=3), run, resume=True)
    assert result.step == 3 and not marker.exists()
    records = [json.loads(x) for x in log.read_text().splitlines()]  # every line parses again
    assert [r["step"] for r in records if "loss_d" in r] == [1, 2, 3]


def test_two_d_steps_with_fresh_fakes_resume_exactly(tmp_path):
    """d_steps = 2 consumes two batches per step (the data position) and reuse_fakes = false draws G's own noise."""
    settings = {"train__d_steps": 2, "train__reuse_fakes": False}
    straight = weights(run_training(tiny_recipe(**settings), tmp_path / "a"))
    run_training(tiny_recipe(**settings, train__steps=2), tmp_path / "b")
    resumed = weights(run_training(tiny_recipe(**settings), tmp_path / "b", resume=True))
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []
    fresh = weights(run_training(tiny_recipe(train__d_steps=2), tmp_path / "c"))  # reuse_fakes on: another algorithm
    assert any(not torch.equal(straight[k], fresh[k]) for k in straight if k.startswith("g."))


@pytest.mark.parametrize("env", ["bf16", "fp16"])
def test_the_recipe_alone_sets_the_precision_whatever_accelerate_config_says(tmp_path, monkeypatch, env):
    """`accelerate config` leaves ACCELERATE_MIXED_PRECISION set: a recipe saying "no" still trains in fp32."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    dtypes = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: dtypes.add(out.dtype) if isinstance(module, torch.nn.Conv2d) else None)
    try:
        run_training(tiny_recipe(train__steps=1), tmp_path / "run")
    finally:
        hook.remove()
    assert dtypes == {torch.float32}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["mixed_precision"] == "no"


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> Path:
    """A finished 2-step run to copy and damage."""
    run = tmp_path_factory.mktemp("saved") / "run"
    run_training(tiny_recipe(train__steps=2), run)
    return run


def copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


DAMAGE = {
    "progress-not-json": ("progress.json", lambda p: p.write_text("{")),
    "progress-a-list": ("progress.json", lambda p: p.write_text("[]")),
    "progress-step-a-string": ("progress.json", lambda p: edit_json(p, lambda v: v.update(step="2"))),
    "progress-missing-batches": ("progress.json", lambda p: edit_json(p, lambda v: v.pop("batches"))),
    "progress-world-size-0": ("progress.json", lambda p: edit_json(p, lambda v: v.update(world_size=0))),
    "progress-bad-scaler": ("progress.json", lambda p: edit_json(p, lambda v: v.update(scalers={"d": {"scale": 1}}))),
    "progress-best-fid-string": ("progress.json", lambda p: edit_json(p, lambda v: v.update(best_fid="inf"))),
    "rng-not-json": ("rng-rank0.json", lambda p: p.write_bytes(b"\xff\x00")),
    "rng-missing-numpy": ("rng-rank0.json", lambda p: edit_json(p, lambda v: v.pop("numpy"))),
    "rng-numpy-position": ("rng-rank0.json", lambda p: edit_json(p, lambda v: v["numpy"].__setitem__(2, 1000))),
    "rng-python-position": ("rng-rank0.json", lambda p: edit_json(p, lambda v: v["python"][1].__setitem__(-1, 9999))),
    "rng-python-a-number": ("rng-rank0.json", lambda p: edit_json(p, lambda v: v.update(python=3))),
    "rng-torch-short": ("rng-rank0.json", lambda p: edit_json(p, lambda v: v.update(torch=v["torch"][:-1]))),
    "rng-torch-byte-300": ("rng-rank0.json", lambda p: edit_json(p, lambda v: v["torch"].__setitem__(0, 300))),
    "rng-numpy-keys-strings": ("rng-rank0.json", lambda p: edit_json(p, lambda v: v["numpy"].__setitem__(1, ["a"] * 624))),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_progress_or_rng_file_is_one_error_naming_it(tmp_path, two_step_run, damage):
    run = copy_run(two_step_run, tmp_path / "run")
    name, change = DAMAGE[damage]
    state = latest_state(run / "state")
    change(state / name)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="damaged") as info:
        run_training(tiny_recipe(train__steps=3), run, resume=True)
    assert name in str(info.value) and "\n" not in str(info.value)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written or lost


@pytest.mark.parametrize("version", ["0.0.9", None])
def test_a_state_written_by_another_release_is_refused(tmp_path, two_step_run, version):
    import sagan_cli

    run = copy_run(two_step_run, tmp_path / "run")
    progress = latest_state(run / "state") / "progress.json"
    assert json.loads(progress.read_text())["version"] == sagan_cli.__version__
    edit_json(progress, lambda v: v.update(version=version) if version else v.pop("version"))
    with pytest.raises(UserError, match=f"written by sagan {version or '0.1.0'}.*this is sagan {sagan_cli.__version__}"):
        run_training(tiny_recipe(train__steps=3), run, resume=True)


def test_a_damaged_state_is_one_error_line_on_the_command_line(tmp_path, two_step_run):
    from helpers import sagan_main

    run = copy_run(two_step_run, tmp_path / "run")
    (latest_state(run / "state") / "progress.json").write_text('{"step": [1]}')
    recipe = tmp_path / "tiny.toml"
    recipe.write_text("\n".join(f"[{table}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
                                for table, values in TINY.items()))
    code, _, err = sagan_main("train", recipe, "--out", run, "--resume", "--set", "train.steps=3")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err


@pytest.mark.parametrize("config", ["kept", "torn", "missing"])
def test_resume_starts_a_run_that_never_checkpointed_from_step_0(tmp_path, two_step_run, config):
    """Killed before its first checkpoint (even while writing config.json): --resume starts it again, exactly."""
    import shutil

    run = copy_run(two_step_run, tmp_path / "run")
    for name in ("state", "g.safetensors", "d.safetensors"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    if config == "torn":
        (run / "config.json").write_text('{"data": {"kind": "synth')
    elif config == "missing":
        (run / "config.json").unlink()
    with pytest.raises(UserError, match="already holds a run"):
        run_training(tiny_recipe(train__steps=2), run)  # never overwritten without --resume
    run_training(tiny_recipe(train__steps=2), run, resume=True)
    straight = load_file(str(latest_state(two_step_run / "state") / "models.safetensors"))  # the same 2 steps
    resumed = load_file(str(latest_state(run / "state") / "models.safetensors"))
    assert straight.keys() == resumed.keys() and [k for k in straight if not torch.equal(straight[k], resumed[k])] == []
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss_d" in x] == [1, 2]  # the killed run's lines are not kept twice
    assert latest_state(run / "state").name == "step-0000002"


def test_resume_of_a_run_that_never_checkpointed_still_checks_the_recipe(tmp_path, two_step_run):
    import shutil

    run = copy_run(two_step_run, tmp_path / "run")
    shutil.rmtree(run / "state")
    for name in ("g.safetensors", "d.safetensors"):
        (run / name).unlink()
    with pytest.raises(UserError, match="model.g_ch"):
        run_training(tiny_recipe(model__g_ch=24), run, resume=True)


def test_resume_never_restarts_over_trained_weights_whose_state_is_gone(tmp_path, two_step_run):
    """g/d.safetensors are written only after a committed state: with them there but state/ deleted, a restart
    from step 0 would empty the log and overwrite the trained weights. Refused, and nothing changes."""
    import shutil

    run = copy_run(two_step_run, tmp_path / "run")
    shutil.rmtree(run / "state")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="g.safetensors but no state/ checkpoint"):
        run_training(tiny_recipe(train__steps=3), run, resume=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(("key", "value"), [("train__seed", 5), ("data__hflip", True), ("data__synthetic_seed", 3)])
def test_resume_refuses_a_change_of_the_data_order(tmp_path, two_step_run, key, value):
    run = copy_run(two_step_run, tmp_path / "run")
    with pytest.raises(UserError, match=rf"{key.replace('__', '.')} .*data order"):
        run_training(tiny_recipe(train__steps=3, **{key: value}), run, resume=True)


def test_resume_accepts_more_data_workers(tmp_path, two_step_run):
    run = copy_run(two_step_run, tmp_path / "run")
    assert run_training(tiny_recipe(train__steps=3, data__workers=1), run, resume=True).step == 3


def test_a_state_that_overflowed_without_a_skipped_step_is_never_saved_or_named_good(tmp_path, two_step_run):
    """--set train.lr_d=1e38 --set train.lr_g=1e38 --resume: the first update has finite losses and gradients
    and blows the weights up; no state with a non-finite tensor (or outputs) is written, g.safetensors stays good."""
    run = copy_run(two_step_run, tmp_path / "run")
    with pytest.raises(UserError, match="training diverged") as info:
        run_training(tiny_recipe(train__steps=12, train__lr_d=1e38, train__lr_g=1e38, train__checkpoint_every=1),
                     run, resume=True)
    good = latest_state(run / "state")
    assert good.name == "step-0000002" and f"the last good checkpoint is {good}" in str(info.value)
    for state in (run / "state").iterdir():
        for name in ("models", "optimizers"):
            for key, tensor in load_file(str(state / f"{name}.safetensors")).items():
                assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), (state.name, key)
    for name in ("g", "d"):
        model, info_ = load_model(run / f"{name}.safetensors")
        assert info_.step == 2 and all(torch.isfinite(t).all() for t in model.state_dict().values())
    g, _ = load_model(run / "g.safetensors", expect="generator")
    assert all(abs(gamma) < 1 for gamma in gammas(g).values())


def test_the_checkpoint_checks_leave_training_unchanged(tmp_path):
    often = weights(run_training(tiny_recipe(train__checkpoint_every=1), tmp_path / "often"))
    rarely = weights(run_training(tiny_recipe(train__checkpoint_every=1000), tmp_path / "rarely"))
    assert [k for k in often if not torch.equal(often[k], rarely[k])] == []


def test_ema_standing_stats_zero_keeps_gs_batchnorm_statistics():
    """`train.ema_standing_stats = 0`: the EMA samples with G's copied statistics, as before standing statistics."""
    recipe = tiny_recipe()
    generator = Generator(recipe.model)
    with torch.no_grad():
        generator.train()(torch.randn(8, recipe.model.z_dim))  # G's statistics move away from their initial values
    kept, reestimated = (EMA(generator, 0.9, 0, batch_size=8, standing_batches=n) for n in (0, 2))
    for ema in (kept, reestimated):
        ema.update(generator, step=1)
    g_stats = {name: buffer for name, buffer in generator.named_buffers() if "running_" in name}
    kept_stats, new_stats = (dict(ema.standing_statistics().named_buffers()) for ema in (kept, reestimated))
    assert g_stats and all(torch.equal(kept_stats[name], buffer) for name, buffer in g_stats.items())
    assert all(not torch.equal(new_stats[name], buffer) for name, buffer in g_stats.items())
