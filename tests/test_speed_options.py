"""--compile and --bf16: faster updates that learn what the plain update learns."""

import os
import subprocess
import sys

import pytest
import torch

import bc
import iql
from tests.test_iql import REPO, train_toy

TINY = dict(
    env_id="mujoco/hopper/tiny-v0",
    batch_size=16,
    hidden_dims=(16, 16),
    eval_freq=0,
    log_freq=25,
    final_eval_episodes=2,
    save_model=True,
    cuda=False,
)


def trained(module, tmp_path, **kwargs):
    summary = module.main(module.Args(**TINY, runs_dir=str(tmp_path), **kwargs))
    return summary, torch.load(tmp_path / summary["run_name"] / "model.pt")


@pytest.mark.parametrize(
    "script, flags",
    [("iql", dict(policy_extraction="both", posthoc_steps=50, num_seeds=2, online_steps=20)), ("bc", dict(top_fraction=0.5))],
)
def test_the_compiled_update_matches_the_eager_one(script, flags, minari_store, tmp_path):
    module = iql if script == "iql" else bc
    eager, eager_model = trained(module, tmp_path / "eager", total_steps=50, **flags)
    compiled, compiled_model = trained(module, tmp_path / "compiled", total_steps=50, compile=True, **flags)
    for name, state in eager_model["networks"].items():
        for key, tensor in state.items():
            torch.testing.assert_close(
                compiled_model["networks"][name][key], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}.{key}: {m}"
            )
    # the cosine schedule ran in the compiled update too, and to the same learning rate
    for name, state in eager_model["optimizers"].items():
        assert float(compiled_model["optimizers"][name]["param_groups"][0]["lr"]) == pytest.approx(
            float(state["param_groups"][0]["lr"])
        )
    assert compiled["policies"].keys() == eager["policies"].keys()


def test_bf16_runs_the_matmuls_in_bfloat16_and_keeps_float32_outside():
    net = iql.Ensemble(8, (64, 64), 1, members=2, generators=[torch.Generator().manual_seed(s) for s in (1, 2)])
    x = torch.randn(2, 32, 8)
    full = net(x)
    with torch.autocast("cpu", torch.bfloat16):
        half = net(x)
    assert half.dtype == torch.float32 and all(p.dtype == torch.float32 for p in net.parameters())
    # bfloat16 keeps 8 bits of mantissa: the results differ, by about that much
    assert 0 < (half - full).abs().max() < 0.05 * full.abs().max()


def test_bf16_learns_the_toy_as_float32_does(minari_store, tmp_path):
    bf16_return, bf16_v = train_toy(0.9, tmp_path, bf16=True)
    assert bf16_v[1].item() == pytest.approx(8.0, abs=1.0)  # V(s1) = 10 * (2 * 0.9 - 1), as in float32
    assert bf16_return == 10.0


def test_compile_without_a_working_compiler_is_one_clear_line(minari_store, tmp_path):
    # no C++ compiler for inductor's CPU kernels, and an empty cache, so that nothing compiled before can stand in
    env = {**os.environ, "PYTHONPATH": REPO, "CXX": "/nonexistent/c++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    flags = ["--env-id", "mujoco/hopper/tiny-v0", "--total-steps", "10", "--compile", "--no-cuda"]
    for script in ("iql.py", "bc.py"):
        result = subprocess.run(
            [sys.executable, os.path.join(REPO, script), *flags],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 1
        assert (
            result.stderr.strip().startswith("error: --compile needs a working torch.compile on cpu")
            and len(result.stderr.strip().splitlines()) == 1
        ), result.stderr
        assert not (tmp_path / "runs").exists()
