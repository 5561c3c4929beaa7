"""Skipped updates (Adam's state and G's BatchNorm untouched), the optimizer plan per device, and fp16 with loss
scaling on the CPU: it trains, resumes bit-exactly, and the scalers' start-up overflows are not divergence."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from helpers import sagan_main, tiny_recipe, weights
from rich.console import Console

from sagan_cli.errors import UserError
from sagan_cli.model.losses import gradient_penalty
from sagan_cli.training.checkpointer import Checkpointer
from sagan_cli.training.loop import make_accelerator, run_training
from sagan_cli.training.nets import BatchNormGuard, build_nets, make_phases
from sagan_cli.training.state import latest_state
from sagan_cli.training.step import Phases, UpdatePlan, make_optimizer, update_plan


def test_the_update_plan_is_a_function_of_the_device_type():
    assert update_plan("cpu", "fp16") == update_plan("cuda", "no") == UpdatePlan(fused=True, device_skip=True)
    for device in ("mps", "xpu"):  # foreach Adam refuses found_inf there: the host reads the skip flag
        assert update_plan(device, "no") == update_plan(device, "bf16") == UpdatePlan(fused=False, device_skip=False)
        with pytest.raises(UserError, match=f"fp16.*not on {device}"):
            update_plan(device, "fp16")


def test_an_unavailable_device_is_refused_in_one_line_before_anything_is_written(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[train]\nsteps = 1\n[model]\nresolution = 32\ng_ch = 16\nd_ch = 16\ng_attention = [16]\n'
                      'd_attention = [8]\n')
    for device, words in (("mps", "--device mps is not available"), ("cuda:1", "device type"), ("gpu0", "not a device")):
        code, _, err = sagan_main("train", recipe, "--out", tmp_path / "run", "--device", device)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err
        assert not (tmp_path / "run").exists()


def phases_for(recipe, plan: UpdatePlan | None = None) -> tuple[Phases, object]:
    torch.manual_seed(0)
    accelerator = make_accelerator(recipe, "unused")
    nets = build_nets(recipe, accelerator)
    phases = make_phases(recipe, nets, accelerator)
    if plan is not None:
        phases.plan = plan
    return phases, nets


def adam_state(optimizer) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.clone() for i, values in optimizer.state_dict()["state"].items() for k, v in values.items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def bn_stats(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


PLANS = {"fused-on-device": UpdatePlan(fused=True, device_skip=True),
         "host-skip": UpdatePlan(fused=False, device_skip=False)}


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("skip", ["d", "g", "both"])
def test_a_skipped_update_leaves_adam_and_g_batchnorm_as_they_were(plan, skip):
    """NaN real images skip D alone; NaN in D's outputs in the G phase (D in eval mode) skips G alone; NaN noise both."""
    recipe = tiny_recipe(train__reuse_fakes=False)
    phases, nets = phases_for(recipe)
    if PLANS[plan].fused != phases.opt_g.defaults["fused"]:  # the other implementation, as on that device
        phases.opt_g = make_optimizer(nets.raw_g, 1e-4, (0.0, 0.9), PLANS[plan])
        phases.opt_d = make_optimizer(nets.raw_d, 4e-4, (0.0, 0.9), PLANS[plan])
    phases.plan = PLANS[plan]
    real, z = torch.rand(8, 3, 32, 32) * 2 - 1, torch.randn(8, 128)
    phases.d_phase(real, None, z, None)  # one good step: Adam has moments and a step count
    phases.g_phase(z, None)
    before = {"d": adam_state(phases.opt_d), "g": adam_state(phases.opt_g)}
    guard = BatchNormGuard(nets.raw_g)
    guard.snapshot()
    bn_before = bn_stats(nets.raw_g)
    real, z = torch.rand(8, 3, 32, 32) * 2 - 1, torch.randn(8, 128)  # another batch: other gradients
    bad_real = real * float("nan") if skip == "d" else real
    bad_z = z * float("nan") if skip == "both" else z
    poison = nets.raw_d.register_forward_hook(lambda m, a, out: out * float("nan") if not m.training else None) \
        if skip == "g" else None
    try:
        d_stats = phases.d_phase(bad_real, None, bad_z, None)
        g_stats = phases.g_phase(bad_z, None)
    finally:
        if poison is not None:
            poison.remove()
    guard.restore_if(g_stats.bad)
    skipped = {"d": skip in ("d", "both"), "g": skip in ("g", "both")}
    assert (d_stats.bad.item(), g_stats.bad.item()) == (float(skipped["d"]), float(skipped["g"]))
    for name, optimizer in (("d", phases.opt_d), ("g", phases.opt_g)):
        after = adam_state(optimizer)
        assert {k for k in after if k.endswith(".step")} and set(after) == set(before[name])
        moments = [k for k in after if k.endswith(("exp_avg", "exp_avg_sq", "step"))]
        unchanged = [k for k in moments if torch.equal(after[k], before[name][k])]
        steps = [k for k in moments if k.endswith("step")]
        if skipped[name]:
            assert unchanged == moments, name
        else:  # updated: every step count moved, and the moments with it (gamma's gradient may be 0 in D)
            assert not set(steps) & set(unchanged) and len(unchanged) <= 2, (name, unchanged)
    for name, model in (("d", nets.raw_d), ("g", nets.raw_g)):
        assert all(torch.isfinite(p).all() for p in model.parameters()), name
    # G's BatchNorm statistics: back to what they were when G's update was skipped, kept when D's alone was
    assert same(bn_stats(nets.raw_g), bn_before) == skipped["g"]
    assert all(torch.isfinite(v).all() for v in bn_stats(nets.raw_g).values())


def test_host_skip_plan_trains_like_the_fused_one(tmp_path, monkeypatch):
    """The mps/xpu path (foreach Adam, the host skips) trains the same steps on the CPU, to round-off."""
    import sagan_cli.training.nets as nets_module

    def losses(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r[key] for r in records if "loss_d" in r for key in ("loss_d", "loss_g")]

    run_training(tiny_recipe(train__steps=3), tmp_path / "fused")
    monkeypatch.setattr(nets_module, "update_plan", lambda device, precision: PLANS["host-skip"])
    result = run_training(tiny_recipe(train__steps=3), tmp_path / "host")
    assert result.step == 3 and len(losses(tmp_path / "host")) == 6
    # Adam normalises round-off in near-zero gradients (conv biases before BatchNorm): compare the losses
    assert losses(tmp_path / "host") == pytest.approx(losses(tmp_path / "fused"), rel=1e-3, abs=1e-4)


def fp16_recipe(**overrides):
    return tiny_recipe(train__mixed_precision="fp16", **overrides)


def test_fp16_trains_with_loss_scaling_on_cpu_and_bootstrap_overflows_are_not_divergence(tmp_path):
    dtypes = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: dtypes.add(out.dtype) if isinstance(module, torch.nn.Conv2d) and module.training else None)
    try:  # max_bad_steps = 1: one counted skip would stop the run
        result = run_training(fp16_recipe(train__steps=6, train__max_bad_steps=1), tmp_path / "run")
    finally:
        hook.remove()
    assert torch.float16 in dtypes and result.step == 6
    assert all(torch.isfinite(p).all() for p in result.generator.parameters())
    scalers = json.loads((latest_state(tmp_path / "run" / "state") / "progress.json").read_text())["scalers"]
    assert set(scalers) == {"d", "g"}
    # the scalers started at 2**16 and lowered it on their start-up overflows (skipped, not counted as divergence)
    assert min(s["scale"] for s in scalers.values()) < 2.0**16


def test_fp16_resumes_bit_exactly_and_the_scalers_round_trip(tmp_path):
    straight = weights(run_training(fp16_recipe(), tmp_path / "a"))
    run_training(fp16_recipe(train__steps=2), tmp_path / "b")
    saved = json.loads((latest_state(tmp_path / "b" / "state") / "progress.json").read_text())["scalers"]
    recipe = fp16_recipe()
    phases, nets = phases_for(recipe)
    Checkpointer(recipe, tmp_path / "b", Accelerator(cpu=True), nets, phases).restore(
        latest_state(tmp_path / "b" / "state"), Console(quiet=True))
    assert {name: scaler.state_dict() for name, scaler in phases.scalers.items()} == saved
    resumed = weights(run_training(fp16_recipe(), tmp_path / "b", resume=True))
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []


def test_wgan_gp_in_fp16_trains_and_its_penalty_goes_through_the_loss_scale(tmp_path):
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    real, fake = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    torch.manual_seed(1)
    plain = gradient_penalty(critic, real, fake)
    torch.manual_seed(1)
    scaled = gradient_penalty(critic, real, fake, scale=torch.tensor(2.0**16))
    assert torch.equal(plain, scaled)  # a power-of-two scale is exact in fp32: scaled, then unscaled
    result = run_training(fp16_recipe(train__loss="wgan-gp", train__steps=3, train__max_bad_steps=1), tmp_path / "run")
    assert result.step == 3 and all(torch.isfinite(p).all() for p in result.discriminator.parameters())


def test_batchnorm_guard_restores_on_a_g_skip_or_broken_statistics_and_keeps_them_otherwise():
    """The guard's three cases, on BatchNorm layers of their own: a skipped G update restores the snapshot;
    a G update that went ahead keeps new finite statistics; non-finite statistics are restored either way."""
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(4))
    guard = BatchNormGuard(bn)
    guard.snapshot()
    bn[1].running_var.fill_(2.0)
    guard.restore_if(torch.zeros(()))
    assert torch.equal(bn[1].running_var, torch.full((4,), 2.0))  # G's update went ahead: kept
    guard.restore_if(torch.ones(()))
    assert torch.equal(bn[1].running_var, torch.ones(4))  # G's update was skipped: restored
    bn[0].running_mean.fill_(float("inf"))
    bn[1].running_var.fill_(2.0)
    guard.restore_if(torch.zeros(()))
    assert torch.equal(bn[0].running_mean, torch.zeros(3)) and torch.equal(bn[1].running_var, torch.ones(4))
    assert int(bn[0].num_batches_tracked) == 0
