"""Faults a user meets in real runs: bad data, leaked temp files, a failing disk, and --eval-only/--resume papercuts."""

import builtins
import dataclasses
import json
import os

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch

import bc
import iql
from tests import datasets
from tests.test_iql import run_cli

HOPPER = "mujoco/hopper/tiny-v0"
TINY = dict(env_id=HOPPER, batch_size=16, hidden_dims=(16,), eval_episodes=2, final_eval_episodes=2, cuda=False)


def planted_dataset(dataset_id: str, part: str, episode: int, step: int, value: float):
    """The tiny Hopper data again, with one bad value in one episode's observations, actions or rewards."""
    env = gym.make("Hopper-v5", max_episode_steps=40)
    episodes = datasets.record_episodes(env, lambda obs, rng: rng.uniform(-1, 1, 3).astype(np.float32), 6, seed=0)
    values = np.array(getattr(episodes[episode], part), dtype=np.float64)
    values[(step, 0) if values.ndim > 1 else step] = value
    episodes[episode] = dataclasses.replace(episodes[episode], **{part: values})
    return datasets.create(dataset_id, env, episodes)


@pytest.mark.parametrize(
    "script, part, value",
    [("iql.py", "observations", np.nan), ("bc.py", "actions", np.inf), ("iql.py", "rewards", -np.inf)],
)
def test_non_finite_data_is_refused_at_load_before_any_run_folder(script, part, value, minari_store, tmp_path):
    dataset_id = f"mujoco/hopper/bad-{part}-v0"
    if dataset_id not in minari.list_local_datasets():
        planted_dataset(dataset_id, part, episode=2, step=5, value=value)
    result = run_cli(script, "--env-id", dataset_id, "--total-steps", "20", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: Minari dataset '{dataset_id}' has 1 NaN or infinite value(s) in its {part}, "
        "the first in episode 2 (counted from 0) at step 5"
    ]
    assert not (tmp_path / "runs").exists()


def test_a_run_leaves_no_file_in_the_temp_folder(minari_store, tmp_path):
    # Gymnasium-Robotics' mazes write an XML file to the temp folder for every environment built
    temp = tmp_path / "temp"
    temp.mkdir()
    flags = ["--total-steps", "20", "--batch-size", "16", "--hidden-dims", "16", "--eval-freq", "10", "--eval-episodes", "2"]
    env = {**os.environ, "TMPDIR": str(temp)}
    for script in ("iql.py", "bc.py"):
        result = run_cli(
            script, "--env-id", "D4RL/antmaze/umaze-tiny-v0", *flags, "--final-eval-episodes", "3", cwd=tmp_path, env=env
        )
        assert result.returncode == 0, result.stderr
    # torch's fused Adam creates torch's own cache folder, one per user that every run shares: not a file a run leaves
    assert [name for name in os.listdir(temp) if not name.startswith("torchinductor_")] == []


@pytest.mark.parametrize(
    "dataset_id",
    [HOPPER, "D4RL/pointmaze/open-tiny-v0", "D4RL/antmaze/umaze-tiny-v0", "D4RL/kitchen/tiny-v0", "D4RL/pen/tiny-v0"],
)
def test_environments_built_once_give_the_episodes_of_fresh_ones(dataset_id, minari_store):
    dataset = minari.load_dataset(dataset_id)
    data, (low, high) = iql.flatten_dataset(dataset), iql.action_bounds(dataset.action_space)
    torch.manual_seed(0)
    actor = iql.Actor(data.observations.shape[1], data.actions.shape[1], (16,), 0.0, False, members=2)
    args = iql.Args(env_id=dataset_id, seed=3, num_seeds=2)
    rule, device = iql.scoring_rule(dataset, dataset_id), torch.device("cpu")
    evaluator = iql.make_evaluator(dataset, rule, args, actor, 3, low, high, device)
    first_seeds = evaluator.first_seeds
    assert first_seeds == [30_000, 40_000]
    # as evaluations were made before: every episode in an environment of its own, built for it
    fresh = [[iql.make_eval_env(dataset, rule, False) for _ in range(2)] for _ in first_seeds]
    before = iql.evaluate(actor, fresh, first_seeds, dataset.observation_space, low, high, device)
    for _ in range(2):  # and the same environments serve every evaluation of the run
        again = iql.evaluate(
            actor, [row[:2] for row in evaluator.envs], first_seeds, dataset.observation_space, low, high, device
        )
        for seed_before, seed_again in zip(before, again):
            for a, b in zip(seed_before, seed_again):
                np.testing.assert_array_equal(a, b)


def fail_writes_to(monkeypatch, module, file_name: str, after: int):
    """Writes to file_name succeed `after` times, then go to /dev/full, as on a full disk."""
    opened = []

    def open_or_fail(path, mode="r", *rest, **kwargs):
        if str(path).endswith(file_name) and mode[0] in "wa":
            opened.append(path)
            if len(opened) > after:
                return builtins.open("/dev/full", mode.replace("a", "w"), *rest, **kwargs)
        return builtins.open(path, mode, *rest, **kwargs)

    monkeypatch.setattr(module, "open", open_or_fail, raising=False)


@pytest.mark.parametrize(
    "module, file_name, after",
    [(iql, "checkpoint.pt.tmp", 1), (iql, "metrics.jsonl", 2), (bc, "evaluations.jsonl", 2), (bc, "checkpoint.pt.tmp", 1)],
)
def test_a_failing_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(
    module, file_name, after, monkeypatch, minari_store, tmp_path
):
    fail_writes_to(monkeypatch, module, file_name, after)
    args = module.Args(**TINY, total_steps=40, checkpoint_freq=10, eval_freq=10, log_freq=10, runs_dir=str(tmp_path))
    with pytest.raises(SystemExit) as stopped:
        module.main(args)
    (run_dir,) = tmp_path.iterdir()
    written = file_name.removesuffix(".tmp")
    assert str(stopped.value).startswith(
        f"error: cannot write {run_dir / written} (OSError: [Errno 28] No space left on device)"
    )
    assert "\n" not in str(stopped.value)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # whole, and from before the failure
    assert checkpoint["progress"]["step"] in (10, 20) and not (run_dir / "checkpoint.pt.tmp").exists()


def test_divergence_names_a_checkpoint_only_when_one_exists(minari_store, tmp_path, monkeypatch):
    update = iql.update_value_and_critic

    def poisoned(batch, *rest):
        metrics, adv = update(batch, *rest)
        return metrics * float("nan"), adv

    monkeypatch.setattr(iql, "update_value_and_critic", poisoned)
    with pytest.raises(SystemExit) as stopped:
        iql.main(iql.Args(**TINY, total_steps=20, checkpoint_freq=0, log_freq=10, runs_dir=str(tmp_path)))
    message = str(stopped.value)
    assert "value_loss, critic_loss, v_mean, q_mean became NaN or infinite at train step 1" in message
    assert "no checkpoint was written before it" in message and "last checkpoint" not in message


def test_eval_only_reports_the_trained_steps_and_keeps_the_runs_videos(minari_store, tmp_path, capsys, renderer):
    flags = dict(TINY, total_steps=20, posthoc_steps=10, policy_extraction="both", eval_freq=0, runs_dir=str(tmp_path))
    iql.main(iql.Args(**flags, capture_video=True))
    (run_dir,) = tmp_path.iterdir()
    videos = sorted((run_dir / "videos").rglob("*.mp4"))
    assert len(videos) == 2
    stamps = [v.stat().st_mtime_ns for v in videos]
    capsys.readouterr()
    iql.main(iql.Args(eval_only=str(run_dir), final_eval_episodes=2), named_flags={"eval_only", "final_eval_episodes"})
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {name: r["step"] for name, r in report["policies"].items()} == {"concurrent": 20, "posthoc": 10}
    assert sorted((run_dir / "videos").rglob("*.mp4")) == videos and [v.stat().st_mtime_ns for v in videos] == stamps


def test_the_other_scripts_run_is_named_by_its_script(minari_store, tmp_path):
    iql.main(iql.Args(**TINY, total_steps=10, eval_freq=0, runs_dir=str(tmp_path / "iql")))
    bc.main(bc.Args(**TINY, total_steps=10, eval_freq=0, runs_dir=str(tmp_path / "bc")))
    for script, other, made_by in (("bc.py", "iql", "iql.py"), ("iql.py", "bc", "bc.py")):
        (run_dir,) = (tmp_path / other).iterdir()
        (run_dir / "summary.json").unlink()  # as if stopped after its last checkpoint
        for flag in ("--resume", "--eval-only"):
            result = run_cli(script, flag, str(run_dir), cwd=tmp_path)
            assert result.returncode == 1
            assert (
                result.stderr.strip()
                == f"error: that run was made by {made_by} (or another version of this script); use that script"
            )
