"""Implicit Q-Learning (IQL) on Minari datasets, in one file.
Copyright (c) 2026 the single-file offline RL authors. MIT License: see LICENSE, or https://opensource.org/license/mit

Paper: Kostrikov, Nair & Levine, "Offline Reinforcement Learning with Implicit Q-Learning" (2021),
https://arxiv.org/abs/2110.06169. Official code: https://github.com/ikostrikov/implicit_q_learning

    python iql.py --env-id mujoco/hopper/medium-v0 --expectile 0.7 --temperature 3
    python iql.py --env-id D4RL/antmaze/umaze-v1      # unset flags take the paper's settings for the dataset's family
    python iql.py --resume runs/{run_name}            # continue a stopped run; --help documents every flag

Outputs go to runs/{run_name}/: args.json, metrics.jsonl, evaluations.jsonl, summary.json,
checkpoint.pt and (with --save-model) model.pt.
"""

import collections
import contextlib
import copy
import difflib
import io
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Optional, Tuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    env_id: str = "mujoco/hopper/medium-v0"
    """the Minari dataset id; the policy is evaluated in the dataset's own evaluation environment"""
    seed: int = 1
    """seed of the networks and the minibatches; evaluation episode i uses env seed 10_000 * seed + i"""
    num_seeds: int = 1
    """train seeds seed, ..., seed + num_seeds - 1 in lockstep in one process, each exactly as it would train alone"""
    cuda: bool = True
    """train on the GPU when one is available; --no-cuda trains on the CPU"""
    torch_threads: Optional[int] = 1
    """CPU threads of torch; 1 keeps runs sharing a machine from slowing each other (torch's default: all cores)"""
    compile: bool = False
    """if toggled, torch.compile the updates (on CUDA with CUDA graphs): for GPUs, where eager updates wait on launches"""
    bf16: bool = False
    """if toggled, matmuls in bfloat16 (autocast); parameters, Adam states and losses stay float32"""
    track: bool = False
    """if toggled, log the run to Weights & Biases"""
    wandb_project_name: str = "offline-rl"
    """the W&B project"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team); None uses your default entity"""
    capture_video: bool = False
    """if toggled, record the first final-evaluation episode of each policy to runs/{run_name}/videos"""
    save_model: bool = False
    """if toggled, save every network, optimiser state, normalisation statistic and these args to model.pt"""
    runs_dir: str = "runs"
    """the folder under which each run writes runs/{run_name}/"""
    checkpoint_freq: int = 50_000
    """write runs/{run_name}/checkpoint.pt every this many gradient steps (0: never), to continue with --resume"""
    resume: Optional[str] = None
    """continue the stopped run in this folder (runs/{run_name}) from its checkpoint, with its stored arguments"""
    eval_only: Optional[str] = None
    """evaluate the policies saved in this run folder (model.pt, else checkpoint.pt), without training"""

    # Algorithm (defaults: the paper's settings; see PAPER_SETTINGS for the per-family ones)
    total_steps: int = 1_000_000
    """the number of gradient steps on V and Q (and the concurrent actor)"""
    batch_size: int = 256
    """the minibatch size"""
    discount: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """the Polyak rate of the target critics"""
    expectile: Optional[float] = None
    """the expectile of the value loss, in (0, 1); 0.5 is SARSA-like. None: the paper's value (0.7; AntMaze 0.9)"""
    temperature: Optional[float] = None
    """the inverse temperature beta of AWR (0: BC). None: the paper's value (3; AntMaze 10; Kitchen and Adroit 0.5)"""
    exp_adv_max: float = 100.0
    """the cap on the AWR weight exp(beta * (Q - V))"""
    actor_lr: float = 3e-4
    """the learning rate of the actor"""
    critic_lr: float = 3e-4
    """the learning rate of the twin Q networks"""
    value_lr: float = 3e-4
    """the learning rate of the V network"""
    hidden_dims: Tuple[int, ...] = (256, 256)
    """the hidden layer sizes of every network"""
    actor_dropout: Optional[float] = None
    """the dropout rate after each hidden activation of the actor. None: the paper's value (Kitchen, Adroit 0.1; else 0)"""
    actor_lr_schedule: Optional[Literal["cosine", "constant"]] = None
    """`cosine` decays the actor learning rate to 0 over its updates, offline and online. None: `cosine` (the official
    offline code), or `constant` with --online-steps (the official fine-tuning config decays nothing)"""
    reward_normalization: Literal["auto", "none", "locomotion", "antmaze"] = "auto"
    """`locomotion`: r * 1000 / (max - min episode return); `antmaze`: r - 1; `auto`: by family (see the README)"""
    state_dependent_std: bool = False
    """if toggled, the actor's log-std is a function of the state (the paper learns one state-independent vector)"""
    policy_extraction: Literal["concurrent", "posthoc", "both"] = "concurrent"
    """`concurrent`: train the actor alongside V/Q (the paper); `posthoc`: afterwards, against the final V/Q"""
    posthoc_steps: Optional[int] = None
    """the gradient steps of the post-hoc actor; None means --total-steps"""
    online_steps: int = 0
    """online fine-tuning after the offline phases (the official train_finetune.py): environment steps per seed, each
    followed by one update of V, Q and the concurrent actor on the dataset plus the seed's online transitions"""
    goal_terminal: bool = False
    """mazes only: end each dataset episode at its first goal step, as a termination (D4RL's convention)"""
    eval_terminate_at_goal: bool = False
    """mazes only: evaluation episodes end at the goal (D4RL's convention) instead of running on (Minari's)"""

    # Evaluation and logging
    eval_freq: int = 50_000
    """evaluate the policy every this many gradient steps (0 disables periodic evaluation)"""
    eval_episodes: int = 10
    """the number of episodes of each periodic evaluation"""
    final_eval_episodes: int = 100
    """the number of episodes of the final evaluation of each policy"""
    log_freq: int = 5_000
    """print and log training metrics (also to metrics.jsonl) every this many gradient steps"""


# The paper's (expectile, temperature, actor dropout) per family, from the official configs; other datasets get
# MuJoCo's, like the official default config.
PAPER_SETTINGS = dict(MuJoCo=(0.7, 3.0, 0.0), AntMaze=(0.9, 10.0, 0.0), Kitchen=(0.7, 0.5, 0.1), Adroit=(0.7, 0.5, 0.1))
# D4RL's reference returns (random, expert), for datasets that carry none (Minari's mujoco/*-v0): a score then means
# what it meant in D4RL.
D4RL_REFERENCE_RETURNS = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "pen": (96.262799, 3076.833),
    "hammer": (-274.856578, 12794.13),
    "door": (-56.512833, 2880.569),
    "relocate": (-6.425911, 4233.878),
}
ACTION_CLIP_EPS = 1e-5
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
EVAL_SEED_BLOCK = 10_000  # training seed k evaluates on env seeds 10_000 k + i: disjoint start states per seed


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def describe(e: Exception) -> str:
    """An exception in one line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__


def resolve_paper_settings(args: Args) -> Tuple[Args, str]:
    """Fill the algorithm flags left at None (and `auto` rewards) with the paper's settings for the dataset's family;
    also return a line saying which settings were given and which came from the paper."""
    family = dataset_family(args.env_id)
    family = family if family in PAPER_SETTINGS else "MuJoCo"  # PointMaze, which the paper does not have
    names = ("expectile", "temperature", "actor_dropout")
    given = {name: getattr(args, name) is not None for name in names}
    paper = {name: value for name, value in zip(names, PAPER_SETTINGS[family]) if not given[name]}
    schedule = args.actor_lr_schedule or ("constant" if args.online_steps else "cosine")
    rewards = args.reward_normalization
    if rewards == "auto" and args.env_id.startswith(("mujoco/", "d4rl/")):  # Minari's locomotion data, or D4RL's files
        rewards = "locomotion"
    elif rewards == "auto":
        rewards = "antmaze" if family == "AntMaze" else "none"
    args = replace(args, reward_normalization=rewards, actor_lr_schedule=schedule, **paper)
    words = [f"{name.replace('_', ' ')} {getattr(args, name):g}" + (" (given)" if given[name] else "") for name in names]
    source = "" if all(given.values()) else f" (the paper's {family} settings)"
    return args, ", ".join(words) + source


def validate_args(args: Args) -> None:
    """Reject bad settings before any work is done, in one line."""
    positive = ["num_seeds", "total_steps", "batch_size", "posthoc_steps", "exp_adv_max", "actor_lr", "critic_lr"]
    positive += ["value_lr", "torch_threads", "eval_episodes", "final_eval_episodes", "log_freq"]
    problems = common_problems(args, positive, ["temperature", "seed", "eval_freq", "checkpoint_freq", "online_steps"])
    if not 0.0 < args.expectile < 1.0:
        problems.append(f"--expectile must be in (0, 1), got {args.expectile}")
    if not 0.0 <= args.discount <= 1.0:
        problems.append(f"--discount must be in [0, 1], got {args.discount}")
    if not 0.0 < args.tau <= 1.0:
        problems.append(f"--tau must be in (0, 1], got {args.tau}")
    if args.online_steps and args.policy_extraction == "posthoc":
        problems.append("--online-steps fine-tunes the concurrent actor, which --policy-extraction posthoc does not train")
    if problems:
        raise SystemExit(f"error: {problems[0]}")


def common_problems(args: Args, positive: list, non_negative: list) -> list:
    """The checks both scripts make: counts and rates, the evaluation seeds, the actor, and the maze-only flags."""
    problems = []
    for name in positive + non_negative:
        value, least = getattr(args, name), "positive" if name in positive else ">= 0"
        if value is not None and (value <= 0 if name in positive else value < 0):
            problems.append(f"{flag(name)} must be {least}, got {value}")
    for name in ("eval_episodes", "final_eval_episodes"):
        if getattr(args, name) > EVAL_SEED_BLOCK:
            seeds = f"the evaluation seeds of one training seed, got {getattr(args, name)}"
            problems.append(f"{flag(name)} must be at most {EVAL_SEED_BLOCK}, {seeds}")
    if not args.hidden_dims or min(args.hidden_dims) <= 0:
        problems.append(f"--hidden-dims must be positive sizes, got {args.hidden_dims}")
    if not 0.0 <= args.actor_dropout < 1.0:
        problems.append(f"--actor-dropout must be in [0, 1), got {args.actor_dropout}")
    if not dataset_family(args.env_id).endswith("Maze"):
        for name in ("goal_terminal", "eval_terminate_at_goal"):
            if getattr(args, name):
                problems.append(f"{flag(name)} applies to maze datasets (pointmaze, antmaze) only, got --env-id {args.env_id}")
    return problems


# Data -----------------------------------------------------------------------------------------------------------------------
def load_minari_dataset(dataset_id: str):
    """From the local store, else downloaded; one error line, with the closest stored ids, if neither works."""
    import minari

    # gymnasium-robotics registers the maze, Kitchen and Adroit environments. Its note on Adroit's rewards is shown for
    # Adroit datasets only; a failure to import it surfaces, explained, when the evaluation environment is built.
    quiet = dataset_family(dataset_id) != "Adroit"
    with contextlib.suppress(Exception), contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        import gymnasium_robotics  # noqa: F401
    listing, local = "`minari list local` lists the stored ids.", list(minari.list_local_datasets())
    if dataset_id in local:
        try:
            return minari.load_dataset(dataset_id)
        except Exception as e:  # a corrupt or half-written dataset folder
            raise SystemExit(f"error: cannot load Minari dataset '{dataset_id}' ({describe(e)})") from None
    close = difflib.get_close_matches(dataset_id, local, n=3, cutoff=0.75)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    store = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
    missing = f"Minari dataset '{dataset_id}' is not in the local store ({store})"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise SystemExit(f"error: {missing}, and HF_HUB_OFFLINE is set, so it was not downloaded.{hint} {listing}")
    print(f"{missing}.{hint} Downloading it...", flush=True)  # the hint at once: a failed download takes long offline
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # its retry warnings would bury our one-line error
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as e:  # minari raises many types here: unknown id, no network, bad id format
        advice = "Set MINARI_DATASETS_PATH to use another store, HF_HUB_OFFLINE=1 to fail at once without a network;"
        raise SystemExit(f"error: {missing} and could not be downloaded ({describe(e)}). {advice} {listing}") from None


@dataclass
class OfflineData:
    """A dataset as arrays; each episode stores its T+1 observations back to back, so s' of a step is the row after s."""

    observations: np.ndarray  # (N + E, obs_dim) float32
    actions: np.ndarray  # (N, act_dim) float32, raw (as in the dataset)
    rewards: np.ndarray  # (N,) float32, raw
    terminations: np.ndarray  # (N,) bool
    truncations: np.ndarray  # (N,) bool
    episode_lengths: np.ndarray  # (E,) int64

    @property
    def obs_rows(self) -> np.ndarray:
        """(N,) row of each transition's s; s' is the next row. Step j of episode e is at row start_e + e + j."""
        episodes = np.repeat(np.arange(len(self.episode_lengths)), self.episode_lengths)
        return np.arange(self.episode_lengths.sum()) + episodes

    @property
    def episode_starts(self) -> np.ndarray:
        """(E,) index of each episode's first transition."""
        return np.concatenate([[0], np.cumsum(self.episode_lengths)[:-1]])

    @property
    def episode_returns(self) -> np.ndarray:
        return np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts)


def flatten_observation(obs, space: gym.Space) -> np.ndarray:
    """(batch, dim) float32; Dict parts concatenated recursively in key (alphabetical) order, as gym.spaces.flatten."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_observation(obs[k], s) for k, s in space.spaces.items()], axis=1)
    return np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)


def flatten_dataset(dataset) -> OfflineData:
    episodes = list(dataset.iterate_episodes())
    if not episodes:
        raise SystemExit(f"error: Minari dataset '{dataset.spec.dataset_id}' has no episodes")

    def stack(part, dtype) -> np.ndarray:
        return np.concatenate([np.asarray(part(e), dtype=dtype) for e in episodes])

    observations = stack(lambda e: flatten_observation(e.observations, dataset.observation_space), np.float32)
    actions = stack(lambda e: np.reshape(e.actions, (len(e.rewards), -1)), np.float32)
    rewards = stack(lambda e: e.rewards, np.float32)
    terminations, truncations = stack(lambda e: e.terminations, bool), stack(lambda e: e.truncations, bool)
    lengths = np.array([len(e.rewards) for e in episodes], dtype=np.int64)
    return OfflineData(observations, actions, rewards, terminations, truncations, lengths)


def check_finite(data: OfflineData, dataset_id: str) -> None:
    """A NaN in the data makes every loss NaN at the first update: say where it is instead, before any run folder exists."""
    first_observations = data.episode_starts + np.arange(len(data.episode_lengths))
    parts = {"observations": first_observations, "actions": data.episode_starts, "rewards": data.episode_starts}
    for name, episode_starts in parts.items():
        values = getattr(data, name)
        bad = ~np.isfinite(values.reshape(len(values), -1))
        if bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            episode = int(np.searchsorted(episode_starts, row, side="right") - 1)
            raise SystemExit(
                f"error: Minari dataset '{dataset_id}' has {int(bad.sum())} NaN or infinite value(s) in its {name}, "
                f"the first in episode {episode} (counted from 0) at step {row - episode_starts[episode]}"
            )


def subset_episodes(data: OfflineData, episodes: np.ndarray, lengths: np.ndarray) -> OfflineData:
    """The first lengths[i] steps of each of the given episodes, with the observation after each kept step."""
    starts = data.episode_starts
    steps = np.concatenate([np.arange(starts[e], starts[e] + n) for e, n in zip(episodes, lengths)])
    rows = np.concatenate([np.arange(starts[e] + e, starts[e] + e + n + 1) for e, n in zip(episodes, lengths)])
    actions, rewards = data.actions[steps], data.rewards[steps]
    terminations, truncations = data.terminations[steps], data.truncations[steps]
    return OfflineData(data.observations[rows], actions, rewards, terminations, truncations, np.asarray(lengths, np.int64))


def cut_episodes_at_goal(data: OfflineData) -> OfflineData:
    """D4RL's maze convention: each episode ends, as a termination, at its first goal step (sparse reward 1); the steps
    after it, spent at or around the goal, are dropped."""
    starts = data.episode_starts
    goal_steps = [np.flatnonzero(data.rewards[start : start + n] >= 1.0) for start, n in zip(starts, data.episode_lengths)]
    reached = np.array([len(g) > 0 for g in goal_steps], dtype=bool)
    lengths = np.array([g[0] + 1 if len(g) else n for g, n in zip(goal_steps, data.episode_lengths)], dtype=np.int64)
    cut = subset_episodes(data, np.arange(len(lengths)), lengths)
    ends = (np.cumsum(lengths) - 1)[reached]
    cut.terminations[ends], cut.truncations[ends] = True, False
    return cut


def reward_transform(mode: str, episode_returns: np.ndarray) -> Tuple[float, float]:
    """(scale, shift) such that the training reward is scale * r + shift."""
    if mode != "locomotion":
        return 1.0, (-1.0 if mode == "antmaze" else 0.0)  # antmaze: r - 1; none: r
    return_range = float(episode_returns.max() - episode_returns.min())
    if return_range <= 0.0:
        raise SystemExit(
            "error: every episode has the same return, so `locomotion` reward normalisation is undefined; "
            "use --reward-normalization none"
        )
    return 1000.0 / return_range, 0.0


def action_bounds(space: gym.Space) -> Tuple[np.ndarray, np.ndarray]:
    if not isinstance(space, gym.spaces.Box) or not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        raise SystemExit(f"error: the policy needs a bounded continuous (Box) action space, the dataset has {space}")
    return space.low.astype(np.float32).ravel(), space.high.astype(np.float32).ravel()


def to_unit_box(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map dataset actions affinely to [-1, 1], the range of the tanh mean (identity for [-1, 1] boxes), then clip to
    [-1 + eps, 1 - eps] as the official data loader does."""
    unit = 2.0 * (actions - low) / (high - low) - 1.0
    return np.clip(unit, -1.0 + ACTION_CLIP_EPS, 1.0 - ACTION_CLIP_EPS).astype(np.float32)


def dataset_family(dataset_id: str) -> str:
    """AntMaze, PointMaze, Kitchen, Adroit, or MuJoCo: the paper's locomotion family, and the default for other ids."""
    for family in ("AntMaze", "PointMaze", "Kitchen"):
        if family.lower() in dataset_id:
            return family
    return "Adroit" if env_name(dataset_id) in ("pen", "hammer", "door", "relocate") else "MuJoCo"


def env_name(dataset_id: str) -> str:
    """The environment part of a Minari id, e.g. hopper in mujoco/hopper/medium-v0."""
    return dataset_id.split("/")[1] if dataset_id.count("/") >= 2 else ""


def scoring_rule(dataset, dataset_id: str) -> dict:
    """The paper's score per family (success, Kitchen tasks, normalised return) and any evaluation length it needs."""
    family, name, metadata = dataset_family(dataset_id), env_name(dataset_id), dataset.storage.metadata
    if family.endswith("Maze"):
        source = "success rate x100: the env's info['success'] at any step"
        return {"kind": "success", "source": source, "max_episode_steps": None}
    if family == "Kitchen":
        tasks = len(dataset.env_spec.kwargs["tasks_to_complete"])
        return {"kind": "tasks", "num_tasks": tasks, "source": f"completed tasks / {tasks} x100", "max_episode_steps": None}
    if metadata.get("ref_min_score") is not None and metadata.get("ref_max_score") is not None:
        ref, source = (float(metadata["ref_min_score"]), float(metadata["ref_max_score"])), "dataset metadata"
    elif name in D4RL_REFERENCE_RETURNS:
        ref, source = D4RL_REFERENCE_RETURNS[name], f"D4RL reference returns of {name}"
    else:
        return {"kind": "none", "source": "none (the dataset carries no reference scores)", "max_episode_steps": None}
    # D4RL's pen references are returns of 100-step episodes; others go with the dataset's spec (Minari's pen: 200)
    d4rl_pen = name == "pen" and np.allclose(ref, D4RL_REFERENCE_RETURNS["pen"], rtol=1e-6)
    source = f"normalised return, references {ref[0]:g} and {ref[1]:g} from {source}"
    steps = 100 if d4rl_pen else None
    return {"kind": "return", "ref_min": ref[0], "ref_max": ref[1], "source": source, "max_episode_steps": steps}


# Networks -------------------------------------------------------------------------------------------------------------------
class Ensemble(nn.Module):
    """`members` independent ReLU MLPs (dropout after each hidden activation), each layer one batched matmul of a
    (members, in, out) weight: (members or fewer, batch, in) -> (members, batch, out). The official initialisation:
    orthogonal (gain sqrt 2; last_gain for the last layer), zero biases; member m drawn from generators[m]."""

    def __init__(self, in_dim, hidden_dims, out_dim, members, generators=None, dropout=0.0, last_gain=math.sqrt(2)):
        super().__init__()
        dims = [in_dim, *hidden_dims, *([out_dim] if out_dim else [])]
        self.dropout, self.activate_last = dropout, out_dim is None
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(members, i, o)) for i, o in zip(dims, dims[1:])])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(members, 1, o)) for o in dims[1:]])
        generators = generators or [None] * members
        for i, w in enumerate(self.weights):
            gain = last_gain if out_dim and i == len(self.weights) - 1 else math.sqrt(2)
            # drawn as nn.Linear holds a weight, (out, in), then transposed: the official code's values
            drawn = [nn.init.orthogonal_(torch.empty(w.shape[2], w.shape[1]), gain, generator=g) for g in generators]
            w.data.copy_(torch.stack(drawn).transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        members = len(self.weights[0])
        if len(x) != members:  # one input for every member
            x = x.repeat_interleave(members // len(x), dim=0)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1 or self.activate_last:
                x = nn.functional.dropout(torch.relu(x), self.dropout, self.training)
        return x.to(self.biases[0].dtype)  # under --bf16's autocast the matmuls ran in bfloat16; the losses are float32


def twin_q(critic: Ensemble, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """(seeds, 2, batch): seed k's twin critics are members 2k and 2k + 1."""
    return critic(torch.cat([obs, actions], dim=-1)).view(len(obs), 2, -1)


class Actor(nn.Module):
    """Gaussian with a tanh-squashed mean (the distribution is not squashed); by default one learned log-std vector.
    A member per seed: observations (members, batch, obs_dim) give a mean and a log-std, each (members, batch, act_dim)."""

    def __init__(self, obs_dim, act_dim, hidden_dims, dropout, state_dependent_std, members=1, generators=None):
        super().__init__()
        self.trunk = Ensemble(obs_dim, hidden_dims, None, members, generators, dropout)
        self.mean = Ensemble(hidden_dims[-1], (), act_dim, members, generators)
        if state_dependent_std:
            self.log_std_layer = Ensemble(hidden_dims[-1], (), act_dim, members, generators, last_gain=1e-3)
        else:
            self.log_std = nn.Parameter(torch.zeros(members, 1, act_dim))

    def forward(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(obs)
        if hasattr(self, "log_std_layer"):
            log_std = self.log_std_layer(h)
        else:
            log_std = self.log_std.expand(len(h), h.shape[1], -1)
        return torch.tanh(self.mean(h)), log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def make_networks(obs_dim: int, act_dim: int, args: Args, seeds: list, policies: list):
    """V, twin critics, their target, an actor per policy; a member per seed (critics: two), drawn from the seed's own
    generator, so that each seed starts as it would alone."""
    inits = [torch.Generator().manual_seed(seed) for seed in seeds]
    value = Ensemble(obs_dim, args.hidden_dims, 1, len(seeds), inits)
    critic = Ensemble(obs_dim + act_dim, args.hidden_dims, 1, 2 * len(seeds), [g for g in inits for _ in range(2)])
    actor_args = (obs_dim, act_dim, args.hidden_dims, args.actor_dropout, args.state_dependent_std, len(seeds), inits)
    actors = nn.ModuleDict({name: Actor(*actor_args) for name in policies})
    return value, critic, copy.deepcopy(critic).requires_grad_(False), actors


# Losses: small pure functions, each checkable by hand -----------------------------------------------------------------------
# Each loss is a batch mean summed over seeds (leading axes): the seeds' parameters are disjoint, so each gets the
# gradients it would alone.
def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """mean(|expectile - 1(u < 0)| * u^2) of u = Q - V; at expectile 0.5 it is mean(0.5 * u^2)."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.square()).mean(-1).sum()


def critic_loss(q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the twins of the mean squared TD error; q is ([seeds,] 2, batch), target ([seeds,] batch)."""
    return (q - target.unsqueeze(-2)).square().mean(-1).sum()


def awr_weights(adv: torch.Tensor, temperature: float, exp_adv_max: float) -> torch.Tensor:
    return torch.exp(temperature * adv).clamp(max=exp_adv_max)


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log N(actions; mean, exp(log_std)^2), summed over action dimensions."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def actor_loss(log_prob: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Advantage-weighted regression: -mean(w * log pi(a|s)); w carries no gradient."""
    return -(weights.detach() * log_prob).mean(-1).sum()


# Update steps ---------------------------------------------------------------------------------------------------------------
def make_optimizer(module: nn.Module, lr: float, tensor_lr: bool = False) -> torch.optim.Adam:
    # Fused Adam: one kernel for all of a network's tensors (3x foreach's speed on a CPU). --compile makes the learning
    # rate a tensor, so that the cosine schedule never recompiles the update.
    lr = torch.tensor(lr).to(next(module.parameters())) if tensor_lr else lr
    return torch.optim.Adam(module.parameters(), lr=lr, fused=True)


def gradient_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, scheduler=None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


Batch = collections.namedtuple("Batch", ["obs", "actions", "rewards", "next_obs", "masks"])  # masks: 1 - termination


class DeviceData:
    """The training data on the training device: the dataset, and with --online-steps each seed's own online transitions;
    minibatches are drawn there, with no host round-trip."""

    def __init__(self, data: OfflineData, rewards, actions, device: torch.device, seeds: list, online_steps: int = 0):
        self.observations = torch.as_tensor(data.observations, device=device)
        self.obs_rows = torch.as_tensor(data.obs_rows, device=device)
        self.actions = torch.as_tensor(actions, device=device)
        self.rewards = torch.as_tensor(rewards, device=device)
        self.masks = torch.as_tensor(1.0 - data.terminations.astype(np.float32), device=device)  # truncations bootstrap
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        # Each seed's online transitions, a row each of s, a, r, mask, s' (4 bytes a number: see the README for sizes)
        self.parts = [self.observations.shape[1], self.actions.shape[1], 1, 1, self.observations.shape[1]]
        self.online = torch.zeros(len(seeds), online_steps, sum(self.parts), device=device)
        self.online_count = 0
        self.envs = None  # with --online-steps, the OnlineEnvs that collect the online transitions

    def sample(self, batch_size: int) -> Batch:
        """A minibatch per seed from its own generator, uniform over data and its online transitions: (seeds, batch, …)"""
        size = len(self.obs_rows) + self.online_count
        draws = [torch.randint(size, (batch_size,), device=g.device, generator=g) for g in self.generators]
        i = torch.stack(draws)
        if self.online_count == 0:
            rows = self.obs_rows[i]
            return Batch(self.observations[rows], self.actions[i], self.rewards[i], self.observations[rows + 1], self.masks[i])
        in_data, j = i < len(self.obs_rows), i.clamp(max=len(self.obs_rows) - 1)
        rows = self.obs_rows[j]
        rewards, masks = self.rewards[j].unsqueeze(-1), self.masks[j].unsqueeze(-1)
        offline = (self.observations[rows], self.actions[j], rewards, masks, self.observations[rows + 1])
        seeds = torch.arange(len(i), device=i.device).unsqueeze(-1)
        online = self.online[seeds, (i - len(self.obs_rows)).clamp(min=0)].split(self.parts, dim=-1)
        obs, actions, rewards, masks, next_obs = (torch.where(in_data.unsqueeze(-1), a, b) for a, b in zip(offline, online))
        return Batch(obs, actions, rewards.squeeze(-1), next_obs, masks.squeeze(-1))

    def append(self, rows: torch.Tensor) -> None:  # one online transition per seed: (seeds, width)
        self.online[:, self.online_count] = rows
        self.online_count += 1

    def state_dict(self) -> dict:  # the online transitions, for checkpoints: a resumed run keeps every one, once
        return {"online": self.online[:, : self.online_count].cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.online_count = state["online"].shape[1]
        self.online[:, : self.online_count] = state["online"]


def update_value_and_critic(batch: Batch, value, critic, target_critic, value_opt, critic_opt, args: Args):
    """V then Q, in the official order; returns the metrics and the advantage Q_target - V_new for the actor."""
    with torch.no_grad():
        q_target = twin_q(target_critic, batch.obs, batch.actions).min(dim=1).values
    v = value(batch.obs).squeeze(-1)
    v_loss = expectile_loss(q_target - v, args.expectile)
    gradient_step(value_opt, v_loss)

    # The actor and the Q target both use the freshly updated V, as the official code does.
    with torch.no_grad():
        v_new, v_next = value(torch.cat([batch.obs, batch.next_obs], dim=1)).squeeze(-1).chunk(2, dim=1)
        td_target = batch.rewards + args.discount * batch.masks * v_next
    q = twin_q(critic, batch.obs, batch.actions)
    q_loss = critic_loss(q, td_target)
    gradient_step(critic_opt, q_loss)
    with torch.no_grad():  # Polyak averaging of the target critics, one fused op for all tensors
        torch._foreach_lerp_(list(target_critic.parameters()), list(critic.parameters()), args.tau)
    seeds = len(v)  # the metrics are means over seeds
    metrics = torch.stack([v_loss.detach() / seeds, q_loss.detach() / seeds, v.detach().mean(), q.detach().mean()])
    return metrics, q_target - v_new


def update_actor(batch: Batch, adv: torch.Tensor, actor: Actor, optimizer, scheduler, args: Args):
    weights = awr_weights(adv, args.temperature, args.exp_adv_max)
    loss = actor_loss(gaussian_log_prob(*actor(batch.obs), batch.actions), weights)
    gradient_step(optimizer, loss, scheduler)
    return torch.stack([loss.detach() / len(adv), adv.mean(), weights.mean()])


def posthoc_advantage(batch: Batch, value, target_critic) -> torch.Tensor:
    """The post-hoc actor learns from the final V and target Q, which no longer change."""
    with torch.no_grad():
        return twin_q(target_critic, batch.obs, batch.actions).min(dim=1).values - value(batch.obs).squeeze(-1)


def actor_steps(args: Args, progress: Optional["Progress"] = None) -> dict:
    """Each actor's own updates, over which its cosine schedule runs (the concurrent actor's: offline, then online); given
    a run's progress, those made by then."""
    if progress is None or progress.phase == "done":
        return {"concurrent": args.total_steps + args.online_steps, "posthoc": args.posthoc_steps or args.total_steps}
    made = collections.Counter()
    for phase in make_phases(args):
        if PHASES.index(phase.name) <= PHASES.index(progress.phase):
            made[phase.policy] += progress.step if phase.name == progress.phase else phase.steps
    return made


def make_learner(obs_dim: int, act_dim: int, args: Args, seeds: list, device: torch.device) -> Tuple[dict, dict]:
    """Everything training changes, each with a state_dict, by group (networks, optimizers, schedulers); and the actors."""
    policies = ["concurrent", "posthoc"] if args.policy_extraction == "both" else [args.policy_extraction]
    value, critic, target_critic, actors = (net.to(device) for net in make_networks(obs_dim, act_dim, args, seeds, policies))
    optimizers = {"value": make_optimizer(value, args.value_lr), "critic": make_optimizer(critic, args.critic_lr)}
    schedulers = {}
    for name, actor in actors.items():
        optimizers[name] = make_optimizer(actor, args.actor_lr, args.compile)
        if args.actor_lr_schedule == "cosine":  # lr_t = lr * (1 + cos(pi t / steps)) / 2: optax's cosine_decay_schedule
            schedulers[name] = torch.optim.lr_scheduler.CosineAnnealingLR(optimizers[name], T_max=actor_steps(args)[name])
    networks = {"value": value, "critic": critic, "target_critic": target_critic}
    networks.update({f"actor_{name}": actor for name, actor in actors.items()})
    return {"networks": networks, "optimizers": optimizers, "schedulers": schedulers}, dict(actors)


def compile_updates(args: Args, device: torch.device) -> tuple:
    """The update steps, compiled with --compile; a missing compiler fails here, in one line, not at the first update."""
    if not args.compile:
        return update_value_and_critic, update_actor
    try:
        torch.compile(lambda x: x * 2)(torch.ones(1, device=device))
    except Exception as e:
        raise SystemExit(
            f"error: --compile needs a working torch.compile on {device} ({describe(e)}); leave out --compile"
        ) from None
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(update_value_and_critic, mode=mode), torch.compile(update_actor, mode=mode)


# Evaluation -----------------------------------------------------------------------------------------------------------------
def stack_observations(observations: list):
    """A list of (possibly nested dict) observations as one batch: an array, or a dict of batches."""
    if isinstance(observations[0], dict):
        return {k: stack_observations([o[k] for o in observations]) for k in observations[0]}
    return np.stack(observations)


@torch.no_grad()
def act(actor: Actor, observations: list, obs_space, low, high, device) -> np.ndarray:
    """The policies' mean actions (dropout off), (seeds, envs, act_dim), for observations[k]: seed k's env observations."""
    was_training = actor.training
    actor.eval()
    obs = np.stack([flatten_observation(stack_observations(o), obs_space) for o in observations])
    mean = actor(torch.as_tensor(obs, device=device))[0].cpu().numpy()
    actor.train(was_training)
    return np.clip(low + (mean + 1.0) * 0.5 * (high - low), low, high)


def make_eval_env(dataset, rule: dict, terminate_at_goal: bool, render: bool = False) -> gym.Env:
    """The dataset's evaluation environment, with the overrides the scoring rule and --eval-terminate-at-goal need."""
    kwargs = {"max_episode_steps": rule["max_episode_steps"]} if rule["max_episode_steps"] else {}
    if terminate_at_goal:  # D4RL's mazes: the episode ends at the goal
        kwargs["continuing_task"] = False
    if render:
        kwargs["render_mode"] = "rgb_array"
    env = dataset.recover_environment(eval_env=True, **kwargs)
    # Gymnasium-Robotics' mazes write their model to an XML file in the temp folder and never delete it; it is loaded now.
    xml = getattr(env.unwrapped, "tmp_xml_file_path", None)
    if xml and os.path.exists(xml):
        os.remove(xml)
    return env


def evaluate(actor: Actor, envs: list, first_seeds: list, obs_space, low, high, device) -> list:
    """One episode of seed k's policy in each env of envs[k] (env seeds first_seeds[k] + i), mean actions; one policy
    call per step serves every env of every seed, and only unfinished envs step. Per seed: returns, successes, tasks."""
    shape = (len(envs), len(envs[0]))
    observations = [[env.reset(seed=seed + i)[0] for i, env in enumerate(row)] for seed, row in zip(first_seeds, envs)]
    returns, successes, tasks = np.zeros(shape), np.zeros(shape, bool), np.zeros(shape, int)
    active = [(k, i) for k in range(shape[0]) for i in range(shape[1])]
    while active:
        actions, still_active = act(actor, observations, obs_space, low, high, device), []  # finished envs keep their last obs
        for k, i in active:
            env = envs[k][i]
            observations[k][i], reward, terminated, truncated, info = env.step(actions[k, i].reshape(env.action_space.shape))
            returns[k, i] += reward
            successes[k, i] |= bool(info.get("success", False))
            tasks[k, i] = max(tasks[k, i], len(info.get("episode_task_completions", ())))
            if not (terminated or truncated):
                still_active.append((k, i))
        active = still_active
    return list(zip(returns, successes, tasks))


def score_summary(episodes, rule: dict) -> dict:
    """Return and score statistics over episodes, scored by the family's rule (see scoring_rule)."""
    returns, successes, tasks = episodes
    scores = None
    if rule["kind"] == "success":
        scores = 100.0 * successes
    elif rule["kind"] == "tasks":
        scores = 100.0 * tasks / rule["num_tasks"]
    elif rule["kind"] == "return":
        scores = 100.0 * (returns - rule["ref_min"]) / (rule["ref_max"] - rule["ref_min"])
    summary = {"return_mean": float(returns.mean()), "return_std": float(returns.std()), "num_episodes": len(returns)}
    summary["score_mean"] = None if scores is None else float(scores.mean())
    summary["score_std"] = None if scores is None else float(scores.std())
    return summary


def over_seeds(results: list, seeds: list) -> dict:
    """One seed's summary as it is; for several, the mean and std over seeds of each seed's mean, and each seed's own."""
    if len(results) == 1:
        return results[0]
    stats = {}
    for quantity in ("return", "score"):
        means = [r[f"{quantity}_mean"] for r in results]
        stats[f"{quantity}_mean"] = None if means[0] is None else float(np.mean(means))
        stats[f"{quantity}_std"] = None if means[0] is None else float(np.std(means))
    seed_results = [{"seed": s, **r} for s, r in zip(seeds, results)]
    return {**stats, "num_episodes": results[0]["num_episodes"], "num_seeds": len(results), "seeds": seed_results}


@dataclass
class Evaluator:
    """The run's evaluation environments, built once and reset with each evaluation's seeds, and how to score them."""

    envs: list  # envs[k][i] plays episode i of training seed k
    first_seeds: list  # seed k's episode i uses env seed first_seeds[k] + i
    obs_space: gym.Space
    low: np.ndarray
    high: np.ndarray
    rule: dict
    device: torch.device

    def run(self, actor: Actor, episodes: int, envs: Optional[list] = None) -> list:
        """A summary per seed of `episodes` episodes, in the run's envs or the given ones."""
        envs = envs or [row[:episodes] for row in self.envs]
        results = evaluate(actor, envs, self.first_seeds, self.obs_space, self.low, self.high, self.device)
        return [score_summary(r, self.rule) for r in results]


def make_evaluator(dataset, rule: dict, args: Args, actor: Actor, episodes: int, low, high, device) -> Evaluator:
    """Build every evaluation env the run needs, after checking one by acting in it (and rendering a frame, with
    --capture-video), so that a problem stops the run before training."""
    try:
        env = make_eval_env(dataset, rule, args.eval_terminate_at_goal, render=args.capture_video)
        obs = env.reset(seed=0)[0]
        if args.capture_video and env.render() is None:
            raise RuntimeError("render() returned no frame")
    except Exception as e:
        advice = "install the package that provides it"
        if isinstance(e, ModuleNotFoundError):  # e.g. a toy environment of this repository's benchmarks/, run elsewhere
            advice = f"its module `{e.name}` cannot be imported: install it, or run from the folder that holds it"
        if args.capture_video:
            advice += "; without a display install libosmesa6 and set MUJOCO_GL=osmesa, or leave out --capture-video"
        raise SystemExit(f"error: cannot build the dataset's evaluation environment ({describe(e)}): {advice}") from None
    try:
        env.step(act(actor, [[obs]], dataset.observation_space, low, high, device)[0, 0].reshape(env.action_space.shape))
    except Exception as e:
        spaces = "its spaces differ from the dataset's"
        raise SystemExit(
            f"error: the policy cannot act in the dataset's evaluation environment ({describe(e)}): {spaces}"
        ) from None
    env.close()
    rule["max_episode_steps"] = env.spec.max_episode_steps
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    envs = [[make_eval_env(dataset, rule, args.eval_terminate_at_goal) for _ in range(episodes)] for _ in seeds]
    return Evaluator(envs, [EVAL_SEED_BLOCK * seed for seed in seeds], dataset.observation_space, low, high, rule, device)


# Run folders, logs, checkpoints, resuming -----------------------------------------------------------------------------------
# What `--resume` and `--eval-only` may change: logging and resources, never the algorithm or the data.
MAY_CHANGE = ("track", "wandb_project_name", "wandb_entity", "log_freq", "checkpoint_freq", "capture_video", "save_model")
PHASES = ("train", "posthoc", "online", "done")  # a run's phases in order; bc.py has only "train"


@dataclass
class Progress:
    """How far a run has come, saved in every checkpoint so that --resume continues where the run stopped."""

    phase: str = "train"
    step: int = 0  # gradient steps done in the phase
    evaluations: list = field(default_factory=list)  # the records of evaluations.jsonl
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    wall_time_s: float = 0.0
    wandb_id: Optional[str] = None


@dataclass
class Run:
    """A training run, handed to each part of the loop: its arguments, folder, seeds, state and progress."""

    args: Args
    seeds: list
    state: dict  # every object with a state_dict, by group (networks, optimizers, schedulers) and name
    policies: dict  # the actors by the names evaluations and summaries give them
    buffer: "DeviceData"
    evaluator: Evaluator
    saved: dict  # what checkpoints carry besides the state: sizes, normalisation, data selection
    progress: Progress = field(default_factory=Progress)
    dir: str = ""
    wandb: object = None  # the wandb module, with --track
    started: float = field(default_factory=time.perf_counter)  # a resumed run's start is moved back by its earlier time

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)


def write_file(path: str, text: str, mode: str = "w") -> None:
    """Every output of a run is written here or in write_checkpoint, so a failing disk stops the run in one line."""
    try:
        with open(path, mode) as f:
            f.write(text)
    except OSError as e:
        raise SystemExit(f"error: cannot write {path} ({describe(e)})") from None


def jsonl(records: list) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(
            f"error: no checkpoint at {path} (the run stopped before its first checkpoint, or ran with --checkpoint-freq 0)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read the checkpoint {path} ({describe(e)}): it is truncated or corrupt") from None


def open_saved_run(args: Args, named: Optional[set]) -> Tuple[Args, dict]:
    """The checkpoint of the run that --resume or --eval-only names, and its arguments, with the user's value of each flag
    of MAY_CHANGE they named (named: the flags given; None from Python: those off their default). Any other named flag
    that differs from the run's is refused."""
    saved_run = args.resume or args.eval_only
    model = os.path.join(saved_run, "model.pt")
    use_model = args.eval_only and os.path.exists(model)
    checkpoint = load_checkpoint(model if use_model else os.path.join(saved_run, "checkpoint.pt"))
    stored, fields = checkpoint["args"], Args.__dataclass_fields__
    if set(stored) - set(fields):
        script = checkpoint.get("script") or ("bc.py" if "top_fraction" in stored else "iql.py")
        raise SystemExit(f"error: that run was made by {script} (or another version of this script); use that script")
    stored = {name: stored.get(name, spec.default) for name, spec in fields.items()}  # a flag added since: its default
    may_change = MAY_CHANGE + (("final_eval_episodes", "cuda", "torch_threads") if args.eval_only else ())
    merged = {}
    for name, spec in fields.items():
        value, old = getattr(args, name), tuple(stored[name]) if isinstance(stored[name], list) else stored[name]
        is_named = name in named if named is not None else value != spec.default
        if name in ("resume", "eval_only") or (name in may_change and is_named):
            merged[name] = value
        elif not is_named or value == old:
            merged[name] = old
        else:
            raise SystemExit(
                f"error: {flag(name)} {value} differs from the run's {old}; "
                "a saved run keeps the arguments that define it (start a new run instead)"
            )
    if args.eval_only:  # videos only when asked for on this command: they would overwrite the run's own
        merged["capture_video"] = args.capture_video
    return Args(**merged), checkpoint


def restore(run: Run, checkpoint: dict) -> None:
    """The state and progress of a checkpoint; with --resume also the random streams: minibatches, dropout."""
    for group, objects in run.state.items():
        for name, obj in objects.items():
            obj.load_state_dict(checkpoint[group][name])
    run.progress = Progress(**checkpoint["progress"])
    run.started -= run.progress.wall_time_s
    if run.args.resume:
        for generator, state in zip(run.buffer.generators, checkpoint["rng"]["minibatches"], strict=True):
            generator.set_state(state)
        torch.set_rng_state(checkpoint["rng"]["torch"])
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])  # none saved without CUDA


def open_run_folder(run: Run) -> None:
    """A new run's folder (only now, everything checked), or a resumed one's, with its logs cut back to the checkpoint."""
    args, progress = run.args, run.progress
    run.dir = args.resume
    if not args.resume:
        last = f"-{run.seeds[-1]}" if len(run.seeds) > 1 else ""
        name = f"{args.env_id.replace('/', '__')}__{args.exp_name}__{args.seed}{last}__{time.time_ns() // 1_000_000}"
        run.dir = os.path.join(args.runs_dir, name)  # ms in the name: runs started together stay apart
        try:
            os.makedirs(run.dir)
        except OSError as e:
            raise SystemExit(
                f"error: cannot create the run folder {run.dir} ({describe(e)}); give a writable --runs-dir"
            ) from None
        write_file(run.path("args.json"), json.dumps(asdict(args), indent=2))
    progress.evaluations = [r for r in progress.evaluations if not r["final"]]  # a stop in the final evaluation redoes it
    write_file(run.path("evaluations.jsonl"), jsonl(progress.evaluations))
    checkpointed = (PHASES.index(progress.phase), progress.step)  # (phase, step) pairs order as the run moves on
    metrics = []
    if os.path.exists(run.path("metrics.jsonl")):
        with open(run.path("metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
    logged = [r for r in metrics if (PHASES.index(r["phase"]), r["step"]) <= checkpointed]
    write_file(run.path("metrics.jsonl"), jsonl(logged))
    if args.track:
        import wandb

        config = {"config": asdict(args), "name": os.path.basename(run.dir), "dir": run.dir, "resume": "allow"}
        wandb_run = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, id=progress.wandb_id, **config)
        run.wandb, progress.wandb_id = wandb, wandb_run.id


def log_metrics(run: Run, phase: str, step: int, steps: int, values: dict, rate: float, eta_s: float, wandb_step: int) -> None:
    """Training metrics (means over seeds) to stdout, metrics.jsonl and W&B."""
    named = " ".join(f"{name.split('/')[1]} {value:.4g}" for name, value in values.items())
    print(f"{phase} step {step:>8}/{steps} | {rate:7.0f} upd/s | ETA {eta_s / 60:5.1f} min | {named}")
    values = {**values, "charts/updates_per_second": rate}
    write_file(run.path("metrics.jsonl"), jsonl([{"phase": phase, "step": step, **values}]), mode="a")
    if run.wandb:
        run.wandb.log(values, step=wandb_step)


def record_evaluation(
    run: Run, policy: str, step: int, episodes: int, wandb_step: int, final: bool = False, name: Optional[str] = None
) -> dict:
    """Evaluate a policy (step: its own updates) into evaluations.jsonl, stdout and W&B, under its name or the given one."""
    start, name = time.perf_counter(), name or policy
    per_seed = run.evaluator.run(run.policies[policy], episodes)
    run.progress.eval_time_s += time.perf_counter() - start
    records = [{"policy": name, "step": step, "final": final, "seed": seed, **r} for seed, r in zip(run.seeds, per_seed)]
    run.progress.evaluations += records
    write_file(run.path("evaluations.jsonl"), jsonl(records), mode="a")
    result = over_seeds(per_seed, run.seeds)
    score = "n/a" if result["score_mean"] is None else f"{result['score_mean']:.1f}"
    over = f" x {len(run.seeds)} seeds; +- over seeds" if len(run.seeds) > 1 else ""
    mean, std = result["return_mean"], result["return_std"]
    print(f"eval {name} @ {step}: return {mean:.1f} +- {std:.1f}, score {score} ({episodes} episodes{over})")
    if run.wandb:  # with several seeds, eval/{policy}/ holds the mean over seeds (what a sweep should optimise)
        prefix = f"eval/{name}{'_final' if final else ''}/"
        logged = {prefix + k: v for k, v in result.items() if k != "seeds" and v is not None}
        if len(run.seeds) > 1:
            for seed, r in zip(run.seeds, per_seed):
                logged.update({f"{prefix}seed_{seed}/{k}": v for k, v in r.items() if v is not None})
        run.wandb.log(logged, step=wandb_step)
    return result


def diverged(run: Run, what: str, where: str) -> SystemExit:
    last = os.path.exists(run.path("checkpoint.pt"))
    kept = f"the last checkpoint before it stays in {run.dir}" if last else f"no checkpoint was written before it in {run.dir}"
    return SystemExit(f"error: the run diverged: {what} became NaN or infinite {where}; {kept}")


def write_checkpoint(run: Run, filename: str) -> None:
    """Everything to continue as if never stopped, or to use the policies: plain tensors, numbers and strings. Written
    to a temporary file, flushed, then renamed: a crash or a full disk mid-write leaves the previous file whole."""
    if not all(torch.isfinite(p).all() for net in run.state["networks"].values() for p in net.parameters()):
        raise diverged(run, "the weights", f"by {run.progress.phase} step {run.progress.step}")  # a NaN gradient, finite loss
    run.progress.wall_time_s = time.perf_counter() - run.started
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    rng = {"minibatches": [g.get_state() for g in run.buffer.generators], "torch": torch.get_rng_state(), "cuda": cuda}
    state = {group: {name: obj.state_dict() for name, obj in objects.items()} for group, objects in run.state.items()}
    checkpoint = {"args": asdict(run.args), "script": os.path.basename(__file__), **run.saved, **state}
    checkpoint.update(progress=asdict(run.progress), rng=rng)
    path = run.path(filename)
    try:
        with open(path + ".tmp", "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports some failed writes as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise SystemExit(f"error: cannot write {path} ({describe(e)}); the previous checkpoint, if any, is intact") from None


def catch_stop_signals(catch: bool = True) -> list:
    """SIGTERM and SIGINT only note the signal, so the loop can checkpoint first; catch=False restores the defaults."""
    received = []
    for sig, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
        signal.signal(sig, (lambda signum, frame: received.append(signum)) if catch else default)
    return received


def stop_here(run: Run, where: str, signum: int) -> None:
    """After SIGTERM or SIGINT: a checkpoint, how to continue, and exit code 143 or 130."""
    write_checkpoint(run, "checkpoint.pt")
    print(f"stopped at {where}; continue with: python {os.path.basename(__file__)} --resume {run.dir}", flush=True)
    raise SystemExit(128 + signum)


# Online fine-tuning ---------------------------------------------------------------------------------------------------------
class OnlineEnvs:
    """Online fine-tuning's environments, one per seed, each with its episode in progress (raw rewards, as evaluated)."""

    def __init__(self, envs: list):
        self.envs, self.observations = envs, None  # None until the online phase starts or resumes

    def start(self, seeds: list, step: int) -> None:
        """A fresh episode in each seed's environment, its random stream drawn from SeedSequence(seed, spawn_key=(step,)):
        a stream no integer env seed gives, so online episodes never replay an evaluation's start states, and a run resumed
        at online step `step` restarts the same way every time. Later episodes continue the stream."""
        for env, seed in zip(self.envs, seeds):
            env.unwrapped.np_random = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(step,))))
        self.observations = [env.reset()[0] for env in self.envs]
        self.returns, self.lengths = np.zeros(len(seeds)), np.zeros(len(seeds), int)
        self.successes, self.tasks = np.zeros(len(seeds), bool), np.zeros(len(seeds), int)
        self.steps, self.started = 0, time.perf_counter()  # since this process started or resumed the phase


@torch.no_grad()
def explore(actor: Actor, obs: np.ndarray, generators: list, device: torch.device) -> np.ndarray:
    """(seeds, act_dim): per seed a sample of its policy's Gaussian (dropout off), the noise from the seed's own generator,
    clipped to [-1, 1] as the official fine-tuning clips it."""
    actor.eval()
    mean, log_std = actor(torch.as_tensor(obs, device=device).unsqueeze(1))
    actor.train()
    noise = torch.stack([torch.randn(mean.shape[-1], device=g.device, generator=g) for g in generators])
    return (mean[:, 0] + noise * log_std[:, 0].exp()).clamp(-1.0, 1.0).cpu().numpy()


def collect(run: Run, step: int, wandb_offset: int) -> torch.Tensor:
    """Online step `step`: each seed acts with a sample of its policy, stored as the dataset is (action mapped to [-1, 1],
    reward transformed, mask 0 only on a termination). Returns the env steps per second, over seeds."""
    online, evaluator, normalization = run.buffer.envs, run.evaluator, run.saved["normalization"]
    if online.observations is None:  # the online phase starts, or a resumed run abandons the episodes it was in
        online.start(run.seeds, step - 1)
    obs = flatten_observation(stack_observations(online.observations), evaluator.obs_space)
    unit = explore(run.policies["concurrent"], obs, run.buffer.generators, evaluator.device)
    actions = evaluator.low + (unit + 1.0) * 0.5 * (evaluator.high - evaluator.low)
    rows = []
    for k, env in enumerate(online.envs):
        next_obs, reward, terminated, truncated, info = env.step(actions[k].reshape(env.action_space.shape))
        online.returns[k] += reward
        online.lengths[k] += 1
        online.successes[k] |= bool(info.get("success", False))
        online.tasks[k] = max(online.tasks[k], len(info.get("episode_task_completions", ())))
        reward = normalization["reward_scale"] * reward + normalization["reward_shift"]
        flat_next = flatten_observation(stack_observations([next_obs]), evaluator.obs_space)[0]
        action = to_unit_box(actions[k], evaluator.low, evaluator.high)
        rows.append(np.concatenate([obs[k], action, [reward, 1.0 - terminated], flat_next]))
        online.observations[k] = next_obs
        if terminated or truncated:
            end_online_episode(run, k, step, wandb_offset + step)
            online.observations[k] = env.reset()[0]
    run.buffer.append(torch.as_tensor(np.stack(rows), dtype=torch.float32, device=evaluator.device))
    online.steps += 1
    rate = len(run.seeds) * online.steps / max(time.perf_counter() - online.started, 1e-9)
    return torch.tensor([rate], dtype=torch.float32, device=evaluator.device)


def end_online_episode(run: Run, k: int, step: int, wandb_step: int) -> None:
    """Seed k's episode ended at online step `step`: its return, score and length to stdout, metrics.jsonl and W&B."""
    online, seed = run.buffer.envs, run.seeds[k]
    episode = (online.returns[k : k + 1], online.successes[k : k + 1], online.tasks[k : k + 1])
    result = score_summary(episode, run.evaluator.rule)
    named = {"return": result["return_mean"], "score": result["score_mean"], "length": int(online.lengths[k])}
    named = {name: value for name, value in named.items() if value is not None}  # no score without a scoring rule
    print(f"online step {step}, seed {seed}: " + ", ".join(f"{name} {value:.5g}" for name, value in named.items()))
    values = {f"charts/online_{name}": value for name, value in named.items()}
    write_file(run.path("metrics.jsonl"), jsonl([{"phase": "online", "step": step, "seed": seed, **values}]), mode="a")
    if run.wandb:  # with several seeds, a key per seed: they end their episodes at different steps
        suffix = f"/seed_{seed}" if len(run.seeds) > 1 else ""
        run.wandb.log({name + suffix: value for name, value in values.items()}, step=wandb_step)
    online.returns[k], online.lengths[k], online.successes[k], online.tasks[k] = 0.0, 0, False, 0


# Training -------------------------------------------------------------------------------------------------------------------
# A run's training phase: V and Q with the concurrent actor ("train"), then the post-hoc actor against the final V and Q
# ("posthoc"), then online fine-tuning ("online"). wandb_offset: the W&B step of its step 0; policy: the actor it trains.
# policy_offset: the updates its policy made before the phase's step 0 (iql.py's online phase: the offline ones)
Phase = collections.namedtuple("Phase", ["name", "steps", "wandb_offset", "policy", "metric_names", "policy_offset"])


def make_phases(args: Args) -> list:
    value_names = ["losses/value_loss", "losses/critic_loss", "charts/v_mean", "charts/q_mean"]
    actor_names = ["losses/actor_loss", "charts/advantage_mean", "charts/awr_weight_mean"]
    if args.policy_extraction == "posthoc":
        phases = [Phase("train", args.total_steps, 0, None, value_names, 0)]
    else:
        phases = [Phase("train", args.total_steps, 0, "concurrent", value_names + actor_names, 0)]
    if args.policy_extraction != "concurrent":
        posthoc_names = [name.replace("/", "/posthoc_") for name in actor_names]
        phases.append(Phase("posthoc", actor_steps(args)["posthoc"], args.total_steps, "posthoc", posthoc_names, 0))
    if args.online_steps:
        online_names = value_names + actor_names + ["charts/env_steps_per_second"]
        offset = sum(phase.steps for phase in phases)
        phases.append(Phase("online", args.online_steps, offset, "concurrent", online_names, args.total_steps))
    return phases


def train_step(run: Run, phase: Phase, updates: tuple) -> torch.Tensor:
    """One gradient step for every seed, online after an env step of each; the metrics (means over seeds) stay on device."""
    args, nets, optimizers = run.args, run.state["networks"], run.state["optimizers"]
    update_vq, update_pi = updates
    online_metrics = collect(run, run.progress.step + 1, phase.wandb_offset) if phase.name == "online" else None
    batch = run.buffer.sample(args.batch_size)
    with torch.autocast(batch.obs.device.type, torch.bfloat16, enabled=args.bf16):  # --bf16: the matmuls only (see Ensemble)
        if phase.name != "posthoc":  # V and Q learn offline ("train") and online
            value_opts = (optimizers["value"], optimizers["critic"])
            metrics, adv = update_vq(batch, nets["value"], nets["critic"], nets["target_critic"], *value_opts, args)
            if args.compile:  # on CUDA the actor's compiled call starts a new CUDA-graph generation, which overwrites these
                metrics, adv = metrics.clone(), adv.clone()
        else:
            metrics, adv = None, posthoc_advantage(batch, nets["value"], nets["target_critic"])
        if phase.policy is None:
            return metrics
        actor, scheduler = run.policies[phase.policy], run.state["schedulers"].get(phase.policy)
        actor_metrics = update_pi(batch, adv, actor, optimizers[phase.policy], scheduler, args)
    if online_metrics is not None:
        return torch.cat([metrics, actor_metrics, online_metrics])
    return actor_metrics if metrics is None else torch.cat([metrics, actor_metrics])


def train_phase(run: Run, phase: Phase, updates: tuple, stop: list) -> None:
    """The phase's gradient steps from where the run stands, with logs, evaluations, checkpoints and stops between them."""
    args, progress = run.args, run.progress
    first_step, phase_start = progress.step + 1, time.perf_counter()
    last_log = (progress.step, progress.train_time_s)
    nonfinite_at = torch.full((len(phase.metric_names),), -1, device=run.buffer.obs_rows.device)  # first bad step per metric
    for step in range(first_step, phase.steps + 1):
        tick = time.perf_counter()
        metrics = train_step(run, phase, updates)
        nonfinite_at = torch.where((nonfinite_at < 0) & ~torch.isfinite(metrics), step, nonfinite_at)
        progress.step = step
        progress.train_time_s += time.perf_counter() - tick

        log_now = step % args.log_freq == 0 or step in (300, phase.steps)  # an early line: speed and ETA
        stopping = bool(stop)  # read once: a signal may arrive while this step is being wrapped up
        checkpoint_now = stopping or (args.checkpoint_freq > 0 and step % args.checkpoint_freq == 0)
        eval_now = phase.policy is not None and args.eval_freq > 0 and step % args.eval_freq == 0 and step < phase.steps
        if (log_now or checkpoint_now or eval_now or step % 1000 == 0) and nonfinite_at.max() >= 0:  # a host sync: rarely
            first = int(nonfinite_at[nonfinite_at >= 0].min())
            which = ", ".join(n.split("/")[1] for n, s in zip(phase.metric_names, nonfinite_at.tolist()) if s == first)
            raise diverged(run, which, f"at {phase.name} step {first}")
        if log_now:
            rate = (step - last_log[0]) / max(progress.train_time_s - last_log[1], 1e-9)
            eta = (phase.steps - step) * (time.perf_counter() - phase_start) / (step - first_step + 1)
            values = dict(zip(phase.metric_names, metrics.tolist()))
            log_metrics(run, phase.name, step, phase.steps, values, rate, eta, phase.wandb_offset + step)
            last_log = (step, progress.train_time_s)
        if eval_now:
            record_evaluation(run, phase.policy, phase.policy_offset + step, args.eval_episodes, phase.wandb_offset + step)
        if stopping:
            stop_here(run, f"{phase.name} step {step}", stop[0])
        if checkpoint_now:
            write_checkpoint(run, "checkpoint.pt")


def train(run: Run, phases: list, updates: tuple, stop: list) -> None:
    """The phases in order, skipping those a resumed run has finished; before online fine-tuning, the offline policy's
    evaluation, with --final-eval-episodes; then a checkpoint before the final evaluation."""
    order = [phase.name for phase in phases] + ["done"]
    for index, phase in enumerate(phases):
        if order.index(run.progress.phase) <= index:
            if phase.name == "online" and run.progress.step == 0:
                episodes, step = run.args.final_eval_episodes, phase.policy_offset
                record_evaluation(run, "concurrent", step, episodes, phase.wandb_offset, name="offline")
            train_phase(run, phase, updates, stop)
            run.progress.phase, run.progress.step = order[index + 1], 0
    if stop:
        stop_here(run, "the end of training", stop[0])
    if run.args.checkpoint_freq > 0:
        write_checkpoint(run, "checkpoint.pt")  # a run stopped during the final evaluation resumes there


def record_videos(run: Run, dataset, run_dir: str) -> None:
    """The first final-evaluation episode of the first seed of each policy again, recorded once the results are safe."""
    for name, actor in run.policies.items():
        try:
            env = make_eval_env(dataset, run.evaluator.rule, run.args.eval_terminate_at_goal, render=True)
            video_dir = os.path.join(run_dir, "videos", name)
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda e: e == 0, disable_logger=True)
            run.evaluator.run(actor, 1, [[env]])
            env.close()
        except Exception as e:
            print(f"warning: no video of the {name} policy ({describe(e)})")


def evaluate_saved_run(run: Run, dataset, trained: dict) -> dict:
    """--eval-only: each saved policy for --final-eval-episodes episodes; trained: the updates each has made."""
    results = {}
    for name, actor in run.policies.items():
        results[name] = {
            "step": trained[name],
            **over_seeds(run.evaluator.run(actor, run.args.final_eval_episodes), run.seeds),
        }
    print(json.dumps({"run": run.args.eval_only, "phase": run.progress.phase, "policies": results}))
    if run.args.capture_video:
        record_videos(run, dataset, run.args.eval_only)
    return {"policies": results}


def write_summary(run: Run, results: dict, updates: int, **extra) -> dict:
    """summary.json, whose presence means the run is finished (after model.pt, with --save-model)."""
    args, progress = run.args, run.progress
    progress.wall_time_s = time.perf_counter() - run.started
    summary = {"env_id": args.env_id, "run_name": os.path.basename(run.dir), "seed": args.seed, "seeds": run.seeds}
    summary.update(policies=results, scoring=run.evaluator.rule, **extra, total_steps=args.total_steps)
    summary.update(device=str(run.evaluator.device), updates_per_second=updates / progress.train_time_s)
    summary.update(train_time_s=progress.train_time_s, eval_time_s=progress.eval_time_s, wall_time_s=progress.wall_time_s)
    if args.save_model:
        write_checkpoint(run, "model.pt")
    write_file(run.path("summary.json"), json.dumps(summary, indent=2))
    return summary


def finish(run: Run, dataset, summary: dict) -> dict:
    """Videos, the W&B summary and the last line, once summary.json is written."""
    for env in sum(run.evaluator.envs, []):
        env.close()
    if run.args.capture_video:
        record_videos(run, dataset, run.dir)
    if run.wandb:
        for name, result in summary["policies"].items():
            run.wandb.summary.update({f"final/{name}/{k}": v for k, v in result.items() if k != "seeds"})
        run.wandb.finish()
    speed = f"{summary['updates_per_second']:.0f} updates/s, {summary['eval_time_s']:.0f} s evaluating"
    print(f"done in {summary['wall_time_s']:.0f} s ({speed}); results in {run.dir}")
    return summary


def final_evaluation(run: Run, stop: list) -> dict:
    """Every policy for --final-eval-episodes episodes, then summary.json."""
    args, steps = run.args, actor_steps(run.args)
    updates = sum(phase.steps for phase in make_phases(args))  # also the last W&B step
    results, offline = {}, [r for r in run.progress.evaluations if r["policy"] == "offline"]
    if offline:  # --online-steps: the offline policy first, the paper's "offline -> online fine-tuned" pair
        per_seed = [{k: v for k, v in r.items() if k not in ("policy", "step", "final", "seed")} for r in offline]
        results["offline"] = over_seeds(per_seed, run.seeds)
    for name in run.policies:
        results[name] = record_evaluation(run, name, steps[name], args.final_eval_episodes, updates, final=True)
    if stop:
        stop_here(run, "the final evaluation", stop[0])
    return write_summary(run, results, updates, reward_normalization=args.reward_normalization)


def main(args: Args, named_flags: Optional[set] = None) -> dict:
    """The recipe: the data, the networks, training (offline, post-hoc, online), the final evaluation. named_flags: the
    flags given on the command line, which --resume and --eval-only compare with the run's own."""
    if args.resume and os.path.exists(os.path.join(args.resume, "summary.json")):
        print(f"{args.resume} has finished (its summary.json is written); nothing to resume")
        with open(os.path.join(args.resume, "summary.json")) as f:
            return json.load(f)
    checkpoint, settings = None, "the run's stored settings"
    if args.resume or args.eval_only:
        args, checkpoint = open_saved_run(args, named_flags)
    else:
        args, settings = resolve_paper_settings(args)
    validate_args(args)

    # Data: checked, rewards normalised, on the training device
    dataset = load_minari_dataset(args.env_id)
    low, high = action_bounds(dataset.action_space)
    data = flatten_dataset(dataset)
    check_finite(data, args.env_id)
    if args.goal_terminal:
        data = cut_episodes_at_goal(data)
    reward_scale, reward_shift = reward_transform(args.reward_normalization, data.episode_returns)
    torch.manual_seed(args.seed)  # dropout's masks; every other draw in training has a generator of its own
    torch.set_num_threads(args.torch_threads or torch.get_num_threads())
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    train_rewards = (reward_scale * data.rewards + reward_shift).astype(np.float32)
    buffer = DeviceData(data, train_rewards, to_unit_box(data.actions, low, high), device, seeds, args.online_steps)

    # Networks, optimisers and evaluation environments, all checked before a run folder exists
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    state, policies = make_learner(obs_dim, act_dim, args, seeds, device)
    updates = compile_updates(args, device)
    rule = scoring_rule(dataset, args.env_id)
    episodes = max(args.final_eval_episodes, args.eval_episodes if args.eval_freq and not args.eval_only else 0)
    evaluator = make_evaluator(dataset, rule, args, next(iter(policies.values())), episodes, low, high, device)
    normalization = {"reward_scale": reward_scale, "reward_shift": reward_shift, "action_low": low.tolist()}
    saved = {"obs_dim": obs_dim, "act_dim": act_dim, "normalization": {**normalization, "action_high": high.tolist()}}
    if args.online_steps:  # each seed acts in an environment of its own; checkpoints keep the online transitions
        buffer.envs = OnlineEnvs([make_eval_env(dataset, rule, args.goal_terminal) for _ in seeds])
        state["replay"] = {"online_transitions": buffer}
    run = Run(args, seeds, state, policies, buffer, evaluator, saved)
    if checkpoint:
        restore(run, checkpoint)
    if args.eval_only:
        return evaluate_saved_run(run, dataset, actor_steps(args, run.progress))

    # Train, then evaluate every policy
    open_run_folder(run)
    print(
        f"{args.env_id}: {len(data.rewards):,} transitions in {len(data.episode_lengths):,} episodes; "
        f"reward normalisation '{args.reward_normalization}' (r * {reward_scale:.4g} + {reward_shift:g}); {settings}; "
        f"score: {rule['source']}, evaluation episodes of {rule['max_episode_steps'] or 'unlimited'} steps"
        + (f"; resuming at {run.progress.phase} step {run.progress.step}" if args.resume else "")
    )
    stop = catch_stop_signals()
    try:
        train(run, make_phases(args), updates, stop)
        summary = final_evaluation(run, stop)
    finally:
        catch_stop_signals(False)
    return finish(run, dataset, summary)


if __name__ == "__main__":
    # tyro writes --flag, --flag=value and, for booleans, --no-flag
    given = {a[2:].split("=")[0].replace("-", "_").removeprefix("no_") for a in sys.argv[1:] if a.startswith("--")}
    main(tyro.cli(Args), given)
