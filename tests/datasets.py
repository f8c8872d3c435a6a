"""Tiny Minari datasets built from real environments, for offline tests."""

import gymnasium as gym
import gymnasium_robotics
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer

import tests.toy_envs  # noqa: F401  (registers the toy environments)
from iql import stack_observations

gym.register_envs(gymnasium_robotics)


def record_episodes(env: gym.Env, policy, num_episodes: int, seed: int):
    """Roll `policy(obs, rng)` out for whole episodes and return Minari episode buffers."""
    rng = np.random.default_rng(seed)
    episodes = []
    for e in range(num_episodes):
        obs, _ = env.reset(seed=seed + e)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        done = False
        while not done:
            action = policy(obs, rng)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
            done = terminated or truncated
        episodes.append(
            EpisodeBuffer(
                id=e, observations=stack_observations(observations), actions=actions, rewards=rewards,
                terminations=terminations, truncations=truncations, infos={},
            )
        )
    return episodes


def create(dataset_id: str, env: gym.Env, episodes, eval_env=None, **metadata):
    return minari.create_dataset_from_buffers(
        dataset_id, episodes, env=env.spec, eval_env=(eval_env or env).spec, algorithm_name="test", author="tests",
        author_email="tests@localhost", code_permalink="tests/datasets.py", description="a tiny test dataset",
        **metadata,
    )


def make_hopper_dataset(dataset_id="mujoco/hopper/tiny-v0", num_episodes=12, max_episode_steps=40, seed=0, **metadata):
    """Random actions in the real Hopper-v5: most episodes fall (terminate), some hit the time limit (truncate)."""
    env = gym.make("Hopper-v5", max_episode_steps=max_episode_steps)
    episodes = record_episodes(env, lambda obs, rng: rng.uniform(-1, 1, 3).astype(np.float32), num_episodes, seed)
    return create(dataset_id, env, episodes, **metadata)


def make_two_step_dataset(dataset_id="toy/twostep/fifty-v0", up_fraction=0.5, num_episodes=200, seed=0):
    """The blog's two-step MDP with the given fraction of up actions in every state, exactly balanced."""
    env = gym.make("ToyTwoStep-v0")
    rng = np.random.default_rng(seed)

    def mixture(n):  # exactly round(up_fraction * n) up choices among n, shuffled
        n_up = int(round(up_fraction * n))
        return rng.permutation(np.r_[np.ones(n_up), -np.ones(n - n_up)])

    # the mixture holds at s0, and again among the episodes that reach s1 and those that reach s2
    first = mixture(num_episodes)
    second = np.empty(num_episodes)
    for branch in (first > 0, first < 0):
        second[branch] = mixture(int(branch.sum()))
    plan = iter(np.stack([first, second], 1))
    steps = []

    def policy(obs, rng):
        if obs[0] == 1.0:
            steps.clear()
            steps.extend(next(plan))
        sign = steps.pop(0)
        return np.array([sign * rng.uniform(0.2, 1.0)], np.float32)

    return create(dataset_id, env, record_episodes(env, policy, num_episodes, seed))


def make_bandit_dataset(dataset_id="toy/bandit/fifty-v0", up_fraction=0.5, num_episodes=100, seed=0):
    env = gym.make("ToyBandit-v0")
    signs = iter(np.random.default_rng(seed).permutation(
        np.r_[np.ones(int(round(up_fraction * num_episodes))), -np.ones(num_episodes - int(round(up_fraction * num_episodes)))]
    ))
    policy = lambda obs, rng: np.array([next(signs) * rng.uniform(0.2, 1.0)], np.float32)
    return create(dataset_id, env, record_episodes(env, policy, num_episodes, seed))


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


def make_pen_dataset(dataset_id="D4RL/pen/tiny-v0", num_episodes=3, seed=0):
    """Adroit pen, carrying reference scores as Minari's D4RL/pen datasets do (values of D4RL's pen)."""
    env = gym.make("AdroitHandPen-v1", max_episode_steps=20)
    episodes = record_episodes(env, lambda obs, rng: rng.uniform(-1, 1, 24).astype(np.float32), num_episodes, seed)
    eval_env = gym.make("AdroitHandPen-v1")  # Minari's spec: 200-step episodes
    return create(dataset_id, env, episodes, eval_env=eval_env, ref_min_score=96.262799, ref_max_score=3076.833)
