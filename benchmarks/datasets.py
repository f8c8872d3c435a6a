"""Build the offline benchmark datasets locally, in Minari format, with the recipes D4RL and Minari used.

    python benchmarks/datasets.py toy                    # bandit and two-step MDPs (50/50, 10/90)
    python benchmarks/datasets.py pointmaze              # PointMaze UMaze and Medium, waypoint controller, stitching too
    python benchmarks/datasets.py pointmaze-large        # PointMaze Large, the same way (about 2 minutes)
    python benchmarks/datasets.py hopper                 # medium, medium-replay, medium-expert, from logs/behaviour/hopper
    python benchmarks/datasets.py walker2d               # the same from logs/behaviour/walker2d; halfcheetah likewise

Datasets go to $MINARI_DATASETS_PATH (default ~/.minari/datasets) under the `local/` namespace,
e.g. local/hopper/medium-v0, and a line per dataset (size, return distribution, reference scores)
is appended to $MINARI_DATASETS_PATH/local_datasets.jsonl.
"""

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import sys

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, when run as a script
import benchmarks.toy_envs  # noqa: F401  (registers the toy environments)
from benchmarks import datasets_record
from iql import stack_observations

with contextlib.redirect_stderr(io.StringIO()):  # its note on Adroit reward functions concerns none of these datasets
    import gymnasium_robotics

gym.register_envs(gymnasium_robotics)


def record_episodes(env: gym.Env, policy, num_episodes: int, seed: int, max_steps: int = None):
    """Roll `policy(obs, rng)` out for whole episodes (or until max_steps steps in all) as Minari episode buffers."""
    rng = np.random.default_rng(seed)
    episodes, steps = [], 0
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
                id=e,
                observations=stack_observations(observations),
                actions=actions,
                rewards=rewards,
                terminations=terminations,
                truncations=truncations,
                infos={},
            )
        )
        steps += len(rewards)
        if max_steps is not None and steps >= max_steps:
            break
    return episodes


def create(dataset_id: str, env: gym.Env, episodes, eval_env=None, description="a locally built dataset", **metadata):
    # Minari appends episodes that share an id to one another: number the concatenated lists afresh
    episodes = [dataclasses.replace(episode, id=i) for i, episode in enumerate(episodes)]
    return minari.create_dataset_from_buffers(
        dataset_id,
        episodes,
        env=env.spec,
        eval_env=(eval_env or env).spec,
        algorithm_name="see benchmarks/datasets.py",
        author="offline-rl benchmarks",
        author_email="benchmarks@localhost",
        code_permalink="benchmarks/datasets.py",
        description=description,
        **metadata,
    )


def fingerprint(dataset) -> str:
    """SHA-256 of every episode's observations, actions, rewards, terminations and truncations, in order: two builds of a
    dataset hold the same data exactly when their fingerprints agree, whatever the files' own bytes."""

    def arrays(x):  # the leaves of (nested) dict observations, by key
        return [a for k in sorted(x) for a in arrays(x[k])] if isinstance(x, dict) else [np.ascontiguousarray(x)]

    digest = hashlib.sha256()
    for episode in dataset.iterate_episodes():
        for array in arrays(
            {
                "obs": episode.observations,
                "act": episode.actions,
                "rew": episode.rewards,
                "term": episode.terminations,
                "trunc": episode.truncations,
            }
        ):
            digest.update(f"{array.dtype}{array.shape}".encode() + array.tobytes())
    return digest.hexdigest()


def record_summary(dataset, **extra) -> dict:
    """Size, return distribution and fingerprint of a dataset, appended to local_datasets.jsonl beside the store."""
    returns = np.array([e.rewards.sum() for e in dataset.iterate_episodes()])
    metadata = dataset.storage.metadata
    line = {
        "dataset_id": dataset.spec.dataset_id,
        "episodes": dataset.total_episodes,
        "steps": dataset.total_steps,
        "sha256": fingerprint(dataset),
        "return_min": float(returns.min()),
        "return_mean": float(returns.mean()),
        "return_max": float(returns.max()),
        "return_quartiles": [float(q) for q in np.percentile(returns, [25, 50, 75])],
        "ref_min_score": metadata.get("ref_min_score"),
        "ref_max_score": metadata.get("ref_max_score"),
        **extra,
    }
    os.makedirs(os.path.dirname(datasets_record()), exist_ok=True)
    with open(datasets_record(), "a") as f:
        f.write(json.dumps(line) + "\n")
    print(line)
    return line


# ---------------------------------------------------------------------------------------------
# The toy problems of Declan Oller's IQL blog post (https://declanoller.github.io/iql_1)
# ---------------------------------------------------------------------------------------------
def make_two_step_dataset(dataset_id="toy/twostep/fifty-v0", up_fraction=0.5, num_episodes=200, seed=0):
    """The two-step MDP with exactly `up_fraction` up actions at s0, and again among the episodes
    that reach s1 and among those that reach s2; action magnitudes uniform in [0.2, 1]."""
    env = gym.make("ToyTwoStep-v0")
    rng = np.random.default_rng(seed)

    def mixture(n):  # exactly round(up_fraction * n) up choices among n, shuffled
        n_up = int(round(up_fraction * n))
        return rng.permutation(np.r_[np.ones(n_up), -np.ones(n - n_up)])

    first = mixture(num_episodes)
    second = np.empty(num_episodes)
    for branch in (first > 0, first < 0):
        second[branch] = mixture(int(branch.sum()))
    plan = iter(np.stack([first, second], 1))
    steps = []

    def policy(obs, rng):
        if obs[0] == 1.0:  # at s0: take the next episode's two choices
            steps.clear()
            steps.extend(next(plan))
        return np.array([steps.pop(0) * rng.uniform(0.2, 1.0)], np.float32)

    return create(
        dataset_id, env, record_episodes(env, policy, num_episodes, seed), description=f"two-step MDP, {up_fraction:.0%} up"
    )


def make_bandit_dataset(dataset_id="toy/bandit/fifty-v0", up_fraction=0.5, num_episodes=100, seed=0):
    env = gym.make("ToyBandit-v0")
    n_up = int(round(up_fraction * num_episodes))
    signs = iter(np.random.default_rng(seed).permutation(np.r_[np.ones(n_up), -np.ones(num_episodes - n_up)]))

    def policy(obs, rng):
        return np.array([next(signs) * rng.uniform(0.2, 1.0)], np.float32)

    return create(
        dataset_id,
        env,
        record_episodes(env, policy, num_episodes, seed),
        description=f"one-state bandit, {up_fraction:.0%} good arm",
    )


# ---------------------------------------------------------------------------------------------
# PointMaze, the way D4RL built its maze datasets
# ---------------------------------------------------------------------------------------------
class WaypointController:
    """D4RL's maze data policy: shortest path over maze cells to the current goal, a PD controller
    towards the next cell's centre (the goal itself in the goal's cell), plus Gaussian action noise."""

    def __init__(self, maze, noise: float, p_gain: float = 10.0, d_gain: float = -1.0):
        self.maze, self.noise, self.p_gain, self.d_gain = maze, noise, p_gain, d_gain
        self.free = {(r, c) for r in range(maze.map_length) for c in range(maze.map_width) if maze.maze_map[r][c] != 1}
        self.next_cell, self.goal_cell = {}, None

    def _plan(self, goal_cell):
        """Breadth-first search from the goal: for every free cell, its neighbour one step closer."""
        self.goal_cell, self.next_cell = goal_cell, {goal_cell: goal_cell}
        queue = collections.deque([goal_cell])
        while queue:
            r, c = queue.popleft()
            for nb in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if nb in self.free and nb not in self.next_cell:
                    self.next_cell[nb] = (r, c)
                    queue.append(nb)

    def __call__(self, obs, rng):
        position, velocity, goal = obs["observation"][:2], obs["observation"][2:], obs["desired_goal"]
        goal_cell = tuple(self.maze.cell_xy_to_rowcol(goal))
        if goal_cell != self.goal_cell:
            self._plan(goal_cell)
        cell = tuple(self.maze.cell_xy_to_rowcol(position))
        target = goal if cell == goal_cell else self.maze.cell_rowcol_to_xy(np.array(self.next_cell.get(cell, goal_cell)))
        action = self.p_gain * (target - position) + self.d_gain * velocity + self.noise * rng.standard_normal(2)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


def make_pointmaze_dataset(maze: str, total_steps: int, episode_steps: int, seed=0, noise=0.5):
    """Long noisy goal-reaching trajectories whose goal is resampled on arrival (continuing task,
    sparse reward), cut into episodes of `episode_steps`; evaluated on one goal per episode."""
    env = gym.make(f"PointMaze_{maze}-v3", continuing_task=True, reset_target=True, max_episode_steps=episode_steps)
    eval_env = gym.make(f"PointMaze_{maze}-v3", continuing_task=True, reset_target=False, max_episode_steps=episode_steps)
    controller = WaypointController(env.unwrapped.maze, noise)
    episodes = record_episodes(env, controller, num_episodes=total_steps // episode_steps, seed=seed)
    dataset_id = f"local/pointmaze/{maze.lower()}-v0"
    return create(
        dataset_id, env, episodes, eval_env=eval_env, description=f"PointMaze {maze}, waypoint controller, noise {noise}"
    )


def make_stitching_dataset(maze: str, goal_cell: tuple, total_steps: int, episode_steps: int, seed=0, noise=0.5):
    """D4RL AntMaze's setting: the same noisy drives to random goals, but evaluation asks for one
    fixed goal cell that the data were not aiming at, so `desired_goal` and the sparse reward are
    relabelled to it. Imitation alone no longer finds the goal; the data's pieces must be stitched."""
    env = gym.make(f"PointMaze_{maze}-v3", continuing_task=True, reset_target=True, max_episode_steps=episode_steps)
    eval_map = [list(row) for row in env.unwrapped.maze.maze_map]
    eval_map[goal_cell[0]][goal_cell[1]] = "g"
    eval_env = gym.make(
        f"PointMaze_{maze}-v3", maze_map=eval_map, continuing_task=True, reset_target=False, max_episode_steps=episode_steps
    )
    goal = env.unwrapped.maze.cell_rowcol_to_xy(np.array(goal_cell))
    episodes = record_episodes(
        env, WaypointController(env.unwrapped.maze, noise), num_episodes=total_steps // episode_steps, seed=seed
    )
    relabelled = [
        dataclasses.replace(
            episode,
            observations={
                **episode.observations,
                "desired_goal": np.tile(goal, (len(episode.observations["desired_goal"]), 1)),
            },
            rewards=(np.linalg.norm(episode.observations["achieved_goal"][1:] - goal, axis=1) <= 0.45).astype(np.float64),
        )
        for episode in episodes
    ]
    dataset_id = f"local/pointmaze/{maze.lower()}-stitch-v0"
    return create(
        dataset_id,
        env,
        relabelled,
        eval_env=eval_env,
        description=f"PointMaze {maze}, random-goal drives relabelled to goal cell {goal_cell}",
    )


# ---------------------------------------------------------------------------------------------
# Hopper, Walker2d and HalfCheetah, D4RL-style, from the SAC behaviour policies of behaviour_policies.py
# ---------------------------------------------------------------------------------------------
def replay_episodes(path: str, steps: int):
    """The first `steps` transitions of an SB3 replay buffer (n_envs=1), as episode buffers."""
    replay = np.load(path)
    ends = np.flatnonzero(replay["dones"][:steps] > 0)
    episodes, start = [], 0
    for end in ends:
        sl = slice(start, end + 1)
        truncated = replay["timeouts"][end] > 0
        episodes.append(
            EpisodeBuffer(
                id=len(episodes),
                observations=np.concatenate([replay["observations"][sl], replay["next_observations"][end][None]]),
                actions=replay["actions"][sl],
                rewards=replay["rewards"][sl],
                terminations=np.r_[np.zeros(end - start, bool), [not truncated]],
                truncations=np.r_[np.zeros(end - start, bool), [truncated]],
                infos={},
            )
        )
        start = end + 1
    return episodes


ROBOTS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}


def make_locomotion_datasets(behaviour_dir: str, steps: int, name="hopper", seed=0):
    from stable_baselines3 import SAC

    progress = [json.loads(line) for line in open(os.path.join(behaviour_dir, "progress.jsonl"))]
    best = max(progress, key=lambda p: p["return_mean"])
    # D4RL's "medium": online training stopped once the policy reaches about a third of the best return,
    # i.e. the first checkpoint to reach it (a later dip of an unstable run is not a medium policy)
    medium = next(p for p in progress if p["return_mean"] >= best["return_mean"] / 3)
    env = gym.make(ROBOTS[name])

    def random_policy(obs, rng):
        return rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)

    random_returns = [sum(ep.rewards) for ep in record_episodes(env, random_policy, 20, seed + 999)]
    refs = {"ref_min_score": float(np.mean(random_returns)), "ref_max_score": float(best["return_mean"])}

    def sac_policy(step):  # D4RL recorded SAC's sampled actions, not its mean
        model = SAC.load(os.path.join(behaviour_dir, f"step_{step}.zip"), device="cpu")
        return lambda obs, rng: model.predict(obs, deterministic=False)[0].astype(np.float32)

    # D4RL's "expert" is a fully trained, stable SAC policy. Checkpoints of one run that score alike when
    # deterministic can differ widely when sampled (Hopper: 3,175 ± 24 against 2,421 ± 920), so the expert is
    # the candidate within 5% of the best deterministic return whose sampled rollouts score highest.
    candidates = [p for p in progress if p["return_mean"] >= 0.95 * best["return_mean"]]
    for p in candidates:
        p["sampled_return"] = float(
            np.mean([sum(e.rewards) for e in record_episodes(env, sac_policy(p["step"]), 5, seed + 70_000)])
        )
        print(
            f"expert candidate: step {p['step']}, deterministic {p['return_mean']:.0f}, sampled {p['sampled_return']:.0f}",
            flush=True,
        )
    expert = max(candidates, key=lambda p: p["sampled_return"])
    policies = {
        tag: record_episodes(env, sac_policy(checkpoint["step"]), num_episodes=10**9, seed=seed + offset, max_steps=steps)
        for tag, checkpoint, offset in (("medium", medium, 0), ("expert", expert, 50_000))
    }
    behaviour = {"medium_policy": medium, "expert_policy": expert, "random_return": refs["ref_min_score"]}
    made = [
        create(
            f"local/{name}/medium-v0",
            env,
            policies["medium"],
            description=f"{name} medium: SAC at step {medium['step']}",
            **refs,
        ),
        create(
            f"local/{name}/medium-replay-v0",
            env,
            replay_episodes(os.path.join(behaviour_dir, "replay.npz"), medium["step"]),
            description=f"{name} medium-replay: the SAC replay buffer up to step {medium['step']}",
            **refs,
        ),
        create(
            f"local/{name}/medium-expert-v0",
            env,
            policies["medium"] + policies["expert"],
            description=f"{name} medium-expert: medium plus SAC at step {expert['step']}",
            **refs,
        ),
    ]
    return [record_summary(d, behaviour=behaviour) for d in made]


def main():
    parser = argparse.ArgumentParser(description="Build the local benchmark datasets (see the module docstring).")
    parser.add_argument("which", choices=["toy", "pointmaze", "pointmaze-large", *ROBOTS])
    parser.add_argument("--behaviour", help="robots: the folder of behaviour_policies.py (default: logs/behaviour/{robot})")
    parser.add_argument("--steps", type=int, default=100_000, help="robots: steps per policy's rollouts")
    args = parser.parse_args()
    if args.which == "toy":
        for fraction, tag in ((0.5, "fifty"), (0.1, "ten")):
            record_summary(make_two_step_dataset(f"toy/twostep/{tag}-v0", up_fraction=fraction, num_episodes=400))
            record_summary(make_bandit_dataset(f"toy/bandit/{tag}-v0", up_fraction=fraction, num_episodes=200))
    elif args.which == "pointmaze":
        record_summary(make_pointmaze_dataset("UMaze", total_steps=100_000, episode_steps=300))
        record_summary(make_pointmaze_dataset("Medium", total_steps=200_000, episode_steps=600))
        record_summary(make_stitching_dataset("UMaze", (3, 1), total_steps=100_000, episode_steps=300))
        record_summary(make_stitching_dataset("Medium", (6, 6), total_steps=200_000, episode_steps=600))
    elif args.which == "pointmaze-large":
        # D4RL's maze2d-large: twice Medium's data, as Medium is twice UMaze's, in Gymnasium's 800-step episodes;
        # the stitching goal is the bottom-right free cell, as in Medium
        record_summary(make_pointmaze_dataset("Large", total_steps=400_000, episode_steps=800))
        record_summary(make_stitching_dataset("Large", (7, 10), total_steps=400_000, episode_steps=800))
    else:
        make_locomotion_datasets(args.behaviour or os.path.join("logs", "behaviour", args.which), args.steps, args.which)


if __name__ == "__main__":
    main()
