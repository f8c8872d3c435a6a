"""Train the behaviour policies of the D4RL-style MuJoCo benchmark datasets with stable-baselines3 SAC.

One online SAC run per environment, as D4RL and Minari made theirs. Every --eval-every steps the
policy is evaluated (deterministic, --eval-episodes episodes) and saved as step_{N}.zip, its mean
return appended to progress.jsonl, and the replay buffer so far saved as replay.npz (episode
structure kept: terminations and time-limit truncations), so a run can be stopped at any time and
continued with --resume from its last checkpoint. `datasets.py {robot}` then picks the `medium`
checkpoint (the first to reach a third of the best return), the replay prefix up to it (`medium-replay`) and the
`expert` half of `medium-expert` (of the checkpoints within 5% of the best, the one whose sampled rollouts score
highest). An uninterrupted run is deterministic for its --seed on one kind of processor (a resumed one is not: the
random states are not saved; on another processor torch's float rounding differs and the run parts within a few hundred
steps), so each progress record names the processor; --total-steps only sizes the replay buffer.

    # the behaviour runs of benchmarks.md's Hopper, Walker2d and HalfCheetah datasets
    python benchmarks/behaviour_policies.py --env Hopper-v5 --total-steps 310000 --out logs/behaviour/hopper
    python benchmarks/behaviour_policies.py --env Walker2d-v5 --total-steps 310000 --out logs/behaviour/walker2d
    python benchmarks/behaviour_policies.py --env HalfCheetah-v5 --total-steps 310000 --out logs/behaviour/halfcheetah

stable-baselines3 is a dependency of this benchmark tooling only (benchmarks/requirements.txt).
"""

import argparse
import json
import os
import sys
import time

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, when run as a script
from benchmarks import processor  # noqa: E402


class Checkpoints(BaseCallback):
    def __init__(self, out: str, every: int, episodes: int, env_id: str, seed: int):
        super().__init__()
        self.out, self.every, self.episodes = out, every, episodes
        self.eval_env = gym.make(env_id)
        self.eval_env.reset(seed=seed + 10_000)
        self.start, self.processor = time.time(), processor()

    def _on_step(self) -> bool:
        if self.num_timesteps % self.every == 0:
            returns, _ = evaluate_policy(
                self.model, self.eval_env, n_eval_episodes=self.episodes, deterministic=True, return_episode_rewards=True
            )
            self.model.save(os.path.join(self.out, f"step_{self.num_timesteps}.zip"))
            record = {
                "step": self.num_timesteps,
                "return_mean": float(np.mean(returns)),
                "return_std": float(np.std(returns)),
                "wall_s": time.time() - self.start,
                "processor": self.processor,
            }
            with open(os.path.join(self.out, "progress.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            print(record, flush=True)
            save_replay(self.model, os.path.join(self.out, "replay.npz"))
        return True


def save_replay(model, path: str) -> None:
    """The replay buffer so far, so that a run stopped early still leaves its data behind."""
    buffer, n = model.replay_buffer, model.replay_buffer.size()
    np.savez(
        path + ".tmp.npz",
        observations=buffer.observations[:n, 0],
        next_observations=buffer.next_observations[:n, 0],
        actions=buffer.actions[:n, 0],
        rewards=buffer.rewards[:n, 0],
        dones=buffer.dones[:n, 0],
        timeouts=buffer.timeouts[:n, 0],
    )
    os.replace(path + ".tmp.npz", path)


def resume(out: str, env: gym.Env, buffer_size: int) -> SAC:
    """The last checkpoint with its optimiser states, and the replay buffer saved with it."""
    progress = [json.loads(line) for line in open(os.path.join(out, "progress.jsonl"))]
    step = progress[-1]["step"]
    model = SAC.load(os.path.join(out, f"step_{step}.zip"), env=env, buffer_size=buffer_size)
    saved = np.load(os.path.join(out, "replay.npz"))
    # SB3 calls the callback before it stores the step's transition, so a checkpoint's buffer lacks its last one.
    n = len(saved["rewards"])
    if n != step - 1:
        raise SystemExit(f"error: replay.npz holds {n} transitions, but the last checkpoint is at step {step}")
    buffer = model.replay_buffer
    for key in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        getattr(buffer, key)[:n, 0] = saved[key]
    # The episode running at the checkpoint was cut there; learning restarts from a reset, so mark the
    # cut as a time-limit truncation: SAC keeps bootstrapping through it and datasets.py ends the episode there.
    if not buffer.dones[n - 1, 0]:
        buffer.dones[n - 1, 0] = buffer.timeouts[n - 1, 0] = 1.0
    buffer.pos = n
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--total-steps", type=int, default=300_000)
    parser.add_argument("--eval-every", type=int, default=10_000)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    env = gym.make(args.env)
    if args.resume:
        model = resume(args.out, env, buffer_size=args.total_steps)
    else:
        model = SAC("MlpPolicy", env, buffer_size=args.total_steps, seed=args.seed, verbose=0)
    callback = Checkpoints(args.out, args.eval_every, args.eval_episodes, args.env, args.seed)
    model.learn(args.total_steps - model.num_timesteps, callback=callback, reset_num_timesteps=not args.resume)


if __name__ == "__main__":
    main()
