"""Tiny Minari datasets built from real environments, for offline tests."""

import gymnasium as gym
import numpy as np

from benchmarks.datasets import create, make_bandit_dataset, make_two_step_dataset, record_episodes  # noqa: F401


def make_hopper_dataset(dataset_id="mujoco/hopper/tiny-v0", num_episodes=12, max_episode_steps=40, seed=0, **metadata):
    """Random actions in the real Hopper-v5: most episodes fall (terminate), some hit the time limit (truncate)."""
    env = gym.make("Hopper-v5", max_episode_steps=max_episode_steps)
    episodes = record_episodes(env, lambda obs, rng: rng.uniform(-1, 1, 3).astype(np.float32), num_episodes, seed)
    return create(dataset_id, env, episodes, **metadata)


def make_cartpole_dataset(dataset_id="toy/cartpole/tiny-v0", num_episodes=3, seed=0):
    env = gym.make("CartPole-v1", max_episode_steps=20)
    return create(dataset_id, env, record_episodes(env, lambda obs, rng: int(rng.integers(2)), num_episodes, seed))


def make_pointmaze_dataset(dataset_id="D4RL/pointmaze/open-tiny-v0", num_episodes=4, seed=0):
    """Random actions in the real open PointMaze (sparse reward, continuing task, Dict observations);
    evaluation episodes are 150 steps, enough for a controller to reach any goal."""
    env = gym.make("PointMaze_Open-v3", max_episode_steps=30)
    eval_env = gym.make("PointMaze_Open-v3", max_episode_steps=150)
    episodes = record_episodes(env, lambda obs, rng: rng.uniform(-1, 1, 2).astype(np.float32), num_episodes, seed)
    return create(dataset_id, env, episodes, eval_env=eval_env)


def make_antmaze_dataset(dataset_id="D4RL/antmaze/umaze-tiny-v0", num_episodes=3, seed=0):
    env = gym.make("AntMaze_UMaze-v5", max_episode_steps=25)
    episodes = record_episodes(env, lambda obs, rng: rng.uniform(-1, 1, 8).astype(np.float32), num_episodes, seed)
    return create(dataset_id, env, episodes)


KITCHEN_TASKS = ["microwave", "kettle", "light switch", "slide cabinet"]


def make_kitchen_dataset(dataset_id="D4RL/kitchen/tiny-v0", num_episodes=2, seed=0):
    env = gym.make("FrankaKitchen-v1", tasks_to_complete=KITCHEN_TASKS, max_episode_steps=15)
    episodes = record_episodes(env, lambda obs, rng: rng.uniform(-1, 1, 9).astype(np.float32) * 0.1, num_episodes, seed)
    return create(dataset_id, env, episodes)


def make_pen_dataset(dataset_id="D4RL/pen/tiny-v0", num_episodes=3, seed=0, ref_min_score=96.262799, ref_max_score=3076.833):
    """Adroit pen, carrying reference scores as Minari's D4RL/pen datasets do (by default D4RL's, returns of 100-step
    episodes)."""
    env = gym.make("AdroitHandPen-v1", max_episode_steps=20)
    episodes = record_episodes(env, lambda obs, rng: rng.uniform(-1, 1, 24).astype(np.float32), num_episodes, seed)
    eval_env = gym.make("AdroitHandPen-v1")  # Minari's spec: 200-step episodes
    return create(dataset_id, env, episodes, eval_env=eval_env, ref_min_score=ref_min_score, ref_max_score=ref_max_score)
