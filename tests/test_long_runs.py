"""Long runs survive: checkpoints, resume after a crash or preemption, honest failures, saved policies."""

import json
import math
import os
import signal
import subprocess
import sys

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch

import bc
import iql
from tests.test_iql import REPO, run_cli

HOPPER = "mujoco/hopper/tiny-v0"
SMALL = [
    "--env-id",
    HOPPER,
    "--batch-size",
    "32",
    "--hidden-dims",
    "32",
    "32",
    "--eval-episodes",
    "2",
    "--final-eval-episodes",
    "3",
    "--log-freq",
    "100",
]


def crash(script, kill_at, *flags, cwd):
    """The run, SIGKILLed just before its kill_at-th checkpoint write."""
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "crash_driver.py"), script, str(kill_at), *flags],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]


def assert_same_state(a, b):
    """Every tensor of two checkpoints equal, bit for bit: networks, optimiser states, schedules, RNG states."""
    for key in ("networks", "optimizers", "schedulers", "rng"):
        flat_a, flat_b = flatten(a[key]), flatten(b[key])
        assert flat_a.keys() == flat_b.keys()
        for name in flat_a:
            if isinstance(flat_a[name], torch.Tensor):
                assert torch.equal(flat_a[name], flat_b[name]), f"{key}/{name} differs"
            else:
                assert flat_a[name] == flat_b[name], f"{key}/{name} differs"


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}/").items()}
    if isinstance(tree, (list, tuple)) and any(isinstance(x, (dict, torch.Tensor)) for x in tree):
        return {k: v for i, sub in enumerate(tree) for k, v in flatten(sub, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): tree}


@pytest.mark.parametrize(
    "script, flags, kill_at, stored_step",
    [
        # checkpoints at 150 and 300: killed before writing the second, after the step-200 evaluation
        ("iql", ["--total-steps", "300", "--eval-freq", "100"], 2, 150),
        # checkpoints at V/Q step 150, post-hoc steps 150 and 300: killed in the post-hoc phase, after its step-200 evaluation
        (
            "iql",
            ["--total-steps", "200", "--policy-extraction", "both", "--posthoc-steps", "300", "--eval-freq", "100"],
            3,
            150,
        ),
        ("bc", ["--total-steps", "300", "--eval-freq", "100", "--top-fraction", "0.5"], 2, 150),
        # killed while writing model.pt, after the final evaluation: not finished, so it resumes at the end of training
        ("iql", ["--total-steps", "200", "--eval-freq", "100"], 3, 0),
    ],
    ids=["iql", "iql-posthoc", "bc", "iql-model-write"],
)
def test_a_crashed_run_resumes_as_if_never_stopped(script, flags, kill_at, stored_step, minari_store, tmp_path):
    # dropout draws from torch's global RNG at every update: its state must be restored too
    common = [*SMALL, *flags, "--checkpoint-freq", "150", "--save-model", "--actor-dropout", "0.1"]
    (tmp_path / "straight").mkdir()
    (tmp_path / "crashed").mkdir()
    assert run_cli(f"{script}.py", *common, cwd=tmp_path / "straight").returncode == 0
    (straight,) = (tmp_path / "straight" / "runs").iterdir()
    crashed = crash(script, kill_at, *common, cwd=tmp_path / "crashed")
    assert not (crashed / "summary.json").exists()
    stored = torch.load(crashed / "checkpoint.pt", weights_only=True)
    assert stored["progress"]["step"] == stored_step
    assert len(records(crashed)) > len(stored["progress"]["evaluations"])  # an evaluation made after the checkpoint...

    result = run_cli(f"{script}.py", "--resume", str(crashed), cwd=tmp_path / "crashed")
    assert result.returncode == 0, result.stderr
    assert "resuming at" in result.stdout
    assert records(crashed) == records(straight)  # ...is dropped and made again, the same
    a, b = torch.load(straight / "model.pt", weights_only=True), torch.load(crashed / "model.pt", weights_only=True)
    assert_same_state(a, b)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (straight, crashed)]
    assert summaries[0]["policies"] == summaries[1]["policies"]
    # a finished run is not run again
    again = run_cli(f"{script}.py", "--resume", str(crashed), cwd=tmp_path / "crashed")
    assert again.returncode == 0 and "nothing to resume" in again.stdout


@pytest.mark.parametrize("script, sig, code", [("iql", signal.SIGTERM, 143), ("bc", signal.SIGINT, 130)])
def test_preemption_checkpoints_and_prints_how_to_continue(script, sig, code, minari_store, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    flags = [*SMALL, "--total-steps", "3000", "--eval-freq", "0", "--checkpoint-freq", "0"]
    process = subprocess.Popen(
        [sys.executable, "-u", os.path.join(REPO, f"{script}.py"), *flags],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:  # once the first progress line is out, training is under way
        if line.startswith("train step"):
            break
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    (last_line,) = out.strip().splitlines()[-1:]
    assert last_line.startswith("stopped at train step ") and last_line.endswith(
        f"; continue with: python {script}.py --resume {os.path.join('runs', run_dir.name)}"
    )
    step = int(last_line.split()[4].rstrip(";"))
    assert 100 <= step < 3000  # after the first progress line (--log-freq 100), before the end
    assert (
        torch.load(run_dir / "checkpoint.pt", weights_only=True)["progress"]["step"] == step
    )  # even with --checkpoint-freq 0
    result = run_cli(f"{script}.py", "--resume", os.path.join("runs", run_dir.name), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"resuming at step {step}" in result.stdout or f"resuming at train step {step}" in result.stdout
    assert json.loads((run_dir / "summary.json").read_text())["policies"]


def test_broken_checkpoints_and_changed_flags_are_one_clear_line(minari_store, tmp_path):
    run_dir = crash(
        "iql", 2, *SMALL, "--total-steps", "300", "--eval-freq", "100", "--checkpoint-freq", "150", "--seed", "2", cwd=tmp_path
    )
    path = run_dir / "checkpoint.pt"
    whole = path.read_bytes()
    # a flag that shapes the run is refused, even when given at its default value (--seed 1)
    for flag, value, stored in (("--expectile", "0.9", "0.7"), ("--seed", "1", "2")):
        refused = run_cli("iql.py", "--resume", str(run_dir), flag, value, cwd=tmp_path)
        assert refused.returncode != 0
        assert refused.stderr.strip().splitlines() == [
            f"error: {flag} {value} differs from the run's {stored}; "
            "a saved run keeps the arguments that define it (start a new run instead)"
        ]
    evaluations = (run_dir / "evaluations.jsonl").read_text()
    for broken in (whole[: len(whole) // 2], b"not a checkpoint"):
        path.write_bytes(broken)
        result = run_cli("iql.py", "--resume", str(run_dir), cwd=tmp_path)
        assert result.returncode != 0
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: cannot read the checkpoint {path}") and line.endswith("it is truncated or corrupt")
        assert (
            path.read_bytes() == broken and (run_dir / "evaluations.jsonl").read_text() == evaluations
        )  # nothing overwritten
    assert not (run_dir / "summary.json").exists()


# 1,000 steps of IQL on tiny Hopper with a checkpoint every 100: for faults planted mid-run
CHECKPOINTED_EVERY_100 = dict(env_id=HOPPER, total_steps=1000, batch_size=32, hidden_dims=(32, 32), eval_freq=0, log_freq=500)
CHECKPOINTED_EVERY_100.update(checkpoint_freq=100, cuda=False)


def test_a_broken_environment_or_runs_dir_fails_before_training(minari_store, tmp_path, monkeypatch):
    # a renderer that fails only when a frame is asked for: --capture-video fails before training, naming the fix
    class NoOpenGL(gym.Wrapper):
        def render(self):
            raise RuntimeError("no OpenGL context")

    recover = minari.MinariDataset.recover_environment
    monkeypatch.setattr(
        minari.MinariDataset,
        "recover_environment",
        lambda self, eval_env=False, **kw: NoOpenGL(recover(self, eval_env=eval_env, **kw)),
    )
    with pytest.raises(SystemExit, match="RuntimeError: no OpenGL context.*set MUJOCO_GL=osmesa"):
        iql.main(iql.Args(env_id=HOPPER, total_steps=10, capture_video=True, runs_dir=str(tmp_path / "runs"), cuda=False))
    assert not (tmp_path / "runs").exists()
    assert iql.main(iql.Args(env_id=HOPPER, total_steps=10, final_eval_episodes=1, runs_dir=str(tmp_path / "ok"), cuda=False))[
        "policies"
    ]  # no video, no render
    monkeypatch.undo()

    # no OpenGL at all (an invalid MUJOCO_GL): the same one line, and no run folder
    env = {**os.environ, "PYTHONPATH": REPO, "MUJOCO_GL": "invalid"}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "iql.py"), *SMALL, "--capture-video"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot build the dataset's evaluation environment") and "MUJOCO_GL=osmesa" in line
    assert not (tmp_path / "runs").exists() and "train step" not in result.stdout

    # an evaluation environment whose entry point cannot be imported
    def unimportable(self, eval_env=False, **kwargs):
        raise ModuleNotFoundError("No module named 'some_robots'")

    monkeypatch.setattr(minari.MinariDataset, "recover_environment", unimportable)
    with pytest.raises(
        SystemExit,
        match="cannot build the dataset's evaluation environment \\(ModuleNotFoundError: No module named 'some_robots'\\)",
    ):
        iql.main(iql.Args(env_id=HOPPER, total_steps=10, runs_dir=str(tmp_path / "runs"), cuda=False))
    assert not (tmp_path / "runs").exists()
    monkeypatch.undo()

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    for script in (iql, bc):
        with pytest.raises(SystemExit, match="cannot create the run folder .*give a writable --runs-dir"):
            script.main(script.Args(env_id=HOPPER, total_steps=10, runs_dir=str(not_a_dir / "runs"), cuda=False))


def test_a_diverging_run_stops_at_once_and_keeps_its_last_good_checkpoint(minari_store, tmp_path, monkeypatch):
    sample, draws = iql.DeviceData.sample, []

    def sample_with_a_nan(self, batch_size):
        batch = sample(self, batch_size)
        draws.append(1)
        if len(draws) == 150:  # one NaN reward in the minibatch of step 150
            batch.rewards[0] = math.nan
        return batch

    monkeypatch.setattr(iql.DeviceData, "sample", sample_with_a_nan)
    args = iql.Args(**CHECKPOINTED_EVERY_100, runs_dir=str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        iql.main(args)
    (run_dir,) = tmp_path.iterdir()
    assert (
        str(stop.value.code) == "error: the run diverged: critic_loss became NaN or infinite at train step 150; "
        f"the last checkpoint before it stays in {run_dir}"
    )
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["progress"]["step"] == 100
    assert all(torch.isfinite(p).all() for p in checkpoint["networks"]["critic"].values())
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model.pt").exists()


@pytest.mark.parametrize("script, flags", [("iql", ["--policy-extraction", "both", "--posthoc-steps", "50"]), ("bc", [])])
def test_eval_only_reproduces_the_final_evaluation(script, flags, minari_store, tmp_path):
    assert (
        run_cli(
            f"{script}.py", *SMALL, *flags, "--total-steps", "50", "--eval-freq", "0", "--save-model", cwd=tmp_path
        ).returncode
        == 0
    )
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    module = iql if script == "iql" else bc
    again = module.main(module.Args(eval_only=str(run_dir), cuda=False))
    trained = {name: result.pop("step") for name, result in again["policies"].items()}
    assert again["policies"] == summary["policies"] and set(trained.values()) == {50}
    # --final-eval-episodes given at its default value (100) is still the user's; without model.pt, checkpoint.pt serves
    (run_dir / "model.pt").rename(run_dir / "saved.pt")
    result = run_cli(f"{script}.py", "--eval-only", str(run_dir), "--final-eval-episodes", "100", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {p["num_episodes"] for p in json.loads(result.stdout.strip().splitlines()[-1])["policies"].values()} == {100}
    (run_dir / "saved.pt").rename(run_dir / "model.pt")

    # the saved file opens with torch.load's safe default, and its policy acts as the README shows
    checkpoint = torch.load(run_dir / "model.pt")
    stored = checkpoint["args"]
    name = "actor_concurrent" if script == "iql" else "actor"
    actor = module.Actor(
        checkpoint["obs_dim"], checkpoint["act_dim"], stored["hidden_dims"], 0.0, stored["state_dependent_std"]
    )
    actor.load_state_dict(checkpoint["networks"][name])
    low, high = np.array(checkpoint["normalization"]["action_low"]), np.array(checkpoint["normalization"]["action_high"])
    with torch.no_grad():
        mean, _ = actor.eval()(torch.zeros(1, 1, checkpoint["obs_dim"]))  # (seeds, batch, obs_dim)
    action = low + (mean[0, 0].numpy() + 1) / 2 * (high - low)
    assert action.shape == (3,) and np.all((low <= action) & (action <= high))


def test_the_grid_runner_continues_exactly_the_unfinished_runs(minari_store, tmp_path):
    runs = tmp_path / "runs"
    assert run_cli("bc.py", *SMALL, "--total-steps", "50", "--eval-freq", "0", cwd=tmp_path).returncode == 0  # finished
    (tmp_path / "crashes").mkdir()
    crashed = crash(
        "iql", 2, *SMALL, "--total-steps", "300", "--eval-freq", "0", "--checkpoint-freq", "150", cwd=tmp_path / "crashes"
    )
    crashed = crashed.rename(runs / crashed.name)
    never = crash(
        "bc", 1, *SMALL, "--total-steps", "300", "--eval-freq", "0", "--checkpoint-freq", "150", cwd=tmp_path / "crashes"
    )
    never = never.rename(runs / never.name)  # killed before its first checkpoint was written
    grid = [sys.executable, os.path.join(REPO, "benchmarks", "run_grid.py"), "--resume-all", "--runs-dir", str(runs)]
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run(grid, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = [
        line for line in result.stdout.splitlines() if line.startswith(("python ", "# ")) and not line.startswith("# code: ")
    ]
    expected = [
        f"python iql.py --resume {crashed}",
        f"# {never}: stopped before its first checkpoint; nothing to continue (start it again by hand if wanted)",
    ]
    assert sorted(lines) == sorted(expected)  # the finished bc run is left alone
    assert (crashed / "summary.json").exists() and not (never / "summary.json").exists()


def test_running_a_grid_again_continues_it_without_repeating_a_run(minari_store, tmp_path):
    runs = tmp_path / "runs"
    extra = SMALL[2:] + ["--eval-freq", "0", "--checkpoint-freq", "150"]
    # the grid's IQL run, cut off after its first checkpoint
    crashed = crash(
        "iql",
        2,
        "--env-id",
        HOPPER,
        "--seed",
        "1",
        "--total-steps",
        "300",
        "--policy-extraction",
        "both",
        *extra,
        cwd=tmp_path,
    )
    grid = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "run_grid.py"),
        "--datasets",
        HOPPER,
        "--seeds",
        "1",
        "--steps",
        "300",
        "--algos",
        "iql",
        "bc",
        "bc10",
        "--runs-dir",
        str(runs),
        "--archive",
        str(tmp_path / "archive"),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": REPO}

    def run_grid():
        result = subprocess.run(grid, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return [
            line
            for line in result.stdout.splitlines()
            if line.startswith(("python ", "# ")) and not line.startswith("# code: ")
        ]

    first = run_grid()
    assert first[0] == f"python iql.py --resume {crashed}"
    assert [line.split(" --top-fraction ")[1].split()[0] for line in first[2::2]] == ["1.0", "0.1"]  # BC and 10% BC start
    assert first[1::2] == [f"# archived into {tmp_path / 'archive'}"] * 3  # each run archived as soon as it ends
    assert len(list(runs.glob("*__*"))) == 3 and all((run / "summary.json").exists() for run in runs.glob("*__*"))
    archived = sorted(p.name for p in (tmp_path / "archive" / "runs").iterdir())
    assert archived == sorted(run.name for run in runs.glob("*__*"))
    assert (tmp_path / "archive" / "runs" / crashed.name / "awr_weights.json").exists()  # IQL's, from its final networks
    assert sorted(run_grid()) == sorted(f"# done: {run}" for run in runs.glob("*__*"))
    # the grid's runs come from one version of the code: a checkout at another commit may not add to them
    (runs / "commit.txt").write_text("0" * 40 + "\n")
    result = subprocess.run(grid, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and f"come from commit {'0' * 40}" in result.stderr


def test_a_checkpoint_is_never_written_from_weights_gone_bad(minari_store, tmp_path, monkeypatch):
    # finite losses, then weights poisoned by the update of step 200 itself (as a non-finite gradient would):
    # only the check of the weights before writing catches it
    update, calls = iql.update_value_and_critic, []

    def poisoned(batch, value, critic, *rest):
        out = update(batch, value, critic, *rest)
        calls.append(1)
        if len(calls) == 200:
            with torch.no_grad():
                critic.weights[0][0, 0, 0] = math.inf
        return out

    monkeypatch.setattr(iql, "update_value_and_critic", poisoned)
    args = iql.Args(**CHECKPOINTED_EVERY_100, runs_dir=str(tmp_path))
    with pytest.raises(
        SystemExit, match="the weights became NaN or infinite by train step 200; the last checkpoint before it stays in"
    ):
        iql.main(args)
    (run_dir,) = tmp_path.iterdir()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["progress"]["step"] == 100
