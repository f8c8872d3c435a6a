"""The benchmark dataset recipes do what benchmarks.md says they do (small versions)."""

import json
import os
import subprocess
import sys

import gymnasium as gym
import minari
import numpy as np
import pytest

from benchmarks import datasets


def test_waypoint_controller_reaches_its_goals(minari_store):
    dataset = datasets.make_pointmaze_dataset("UMaze", total_steps=900, episode_steps=300)
    assert dataset.spec.dataset_id == "local/pointmaze/umaze-v0"
    returns = [episode.rewards.sum() for episode in dataset.iterate_episodes()]
    assert min(returns) >= 1  # every 300-step episode reaches at least one goal, then a new goal is drawn


def test_stitching_dataset_is_relabelled_to_the_fixed_evaluation_goal(minari_store):
    dataset = datasets.make_stitching_dataset("UMaze", (3, 1), total_steps=900, episode_steps=300)
    env = dataset.recover_environment(eval_env=True)
    goal = env.unwrapped.maze.cell_rowcol_to_xy(np.array([3, 1]))
    for episode in dataset.iterate_episodes():
        np.testing.assert_array_equal(episode.observations["desired_goal"], np.tile(goal, (len(episode.rewards) + 1, 1)))
        reached = np.linalg.norm(episode.observations["achieved_goal"][1:] - goal, axis=1) <= 0.45
        np.testing.assert_array_equal(episode.rewards, reached.astype(float))
    # evaluation episodes all ask for that one goal (within the env's placement noise)
    goals = [env.reset(seed=s)[0]["desired_goal"] for s in range(3)]
    assert all(np.abs(g - goal).max() <= 0.25 for g in goals)
    assert "local/pointmaze/umaze-stitch-v0" in minari.list_local_datasets()


def test_concatenated_rollouts_keep_every_episode(minari_store):
    # medium-expert is two lists of rollouts whose episode ids both start at 0
    env = gym.make("ToyBandit-v0")

    def policy(obs, rng):
        return rng.uniform(-1, 1, (1,)).astype(np.float32)

    first, second = datasets.record_episodes(env, policy, 3, seed=0), datasets.record_episodes(env, policy, 2, seed=1)
    dataset = datasets.create("local/toy/concatenated-v0", env, first + second)
    assert dataset.total_episodes == 5
    assert [len(e.rewards) for e in dataset.iterate_episodes()] == [1] * 5


def test_each_robot_s_three_datasets_come_from_its_own_behaviour_run(tmp_path, monkeypatch):
    # Walker2d and HalfCheetah are built by Hopper's recipe: the robot is the one thing that changes
    pytest.importorskip("stable_baselines3", reason="benchmarks/requirements.txt")
    from benchmarks import behaviour_policies

    behaviour = tmp_path / "behaviour"
    flags = ["--env", "Walker2d-v5", "--total-steps", "300", "--eval-every", "100", "--eval-episodes", "1"]
    command = [sys.executable, behaviour_policies.__file__, *flags, "--out", str(behaviour)]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))  # a store of its own
    records = datasets.make_locomotion_datasets(str(behaviour), steps=150, name="walker2d")
    ids = ["local/walker2d/medium-v0", "local/walker2d/medium-replay-v0", "local/walker2d/medium-expert-v0"]
    assert [r["dataset_id"] for r in records] == ids
    medium, replay, mixed = (minari.load_dataset(i) for i in ids)
    assert {d.spec.env_spec.id for d in (medium, replay, mixed)} == {"Walker2d-v5"}
    medium_step = records[0]["behaviour"]["medium_policy"]["step"]
    assert replay.total_steps <= medium_step <= replay.total_steps + 1000  # the buffer up to the medium checkpoint
    assert medium.total_steps >= 150 and mixed.total_steps >= medium.total_steps + 150  # medium's rollouts, then the expert's
    for ours, theirs in zip(mixed.iterate_episodes(), medium.iterate_episodes()):
        np.testing.assert_array_equal(ours.actions, theirs.actions)
    assert records[0]["ref_max_score"] == max(json.loads(line)["return_mean"] for line in open(behaviour / "progress.jsonl"))
