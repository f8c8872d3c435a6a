"""Implicit Q-Learning (IQL) on Minari datasets, in one file.
Copyright (c) 2026 the single-file offline RL authors. MIT License: see LICENSE, or https://opensource.org/license/mit

Paper: Kostrikov, Nair & Levine, "Offline Reinforcement Learning with Implicit Q-Learning" (2021), https://arxiv.org/abs/2110.06169
Official code: https://github.com/ikostrikov/implicit_q_learning

    python iql.py --env-id mujoco/hopper/medium-v0 --expectile 0.7 --temperature 3
    python iql.py --env-id D4RL/antmaze/umaze-v1      # unset flags take the paper's settings for the dataset's family
    python iql.py --resume runs/{run_name}            # continue a stopped run; --help documents every flag

Outputs go to runs/{run_name}/: args.json, dataset_overview.png, evaluations.jsonl, summary.json, checkpoint.pt, model.pt.
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
from dataclasses import asdict, dataclass, replace
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
    """train seeds seed, ..., seed + num_seeds - 1 in one process, in lockstep: each as it would train alone, every layer one batched matmul for all"""
    cuda: bool = True
    """if toggled, train on the GPU when one is available"""
    torch_threads: Optional[int] = 1
    """CPU threads of torch; 1 keeps runs sharing a machine from slowing each other (torch's default, all cores, made 2 runs on 2 cores 16-35x slower)"""
    compile: bool = False
    """if toggled, torch.compile the update steps, on CUDA also captured in CUDA graphs (mode reduce-overhead): for GPUs, where eager updates wait on launches"""
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
    """evaluate the policies saved in this run folder (model.pt, else checkpoint.pt) for --final-eval-episodes episodes, without training"""

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
    """the expectile of the value loss, in (0, 1); 0.5 is SARSA-like, towards 1 approaches the in-data max. None: the paper's value for the dataset's family (0.7; AntMaze 0.9)"""
    temperature: Optional[float] = None
    """the inverse temperature beta of the AWR actor loss (0 = behaviour cloning). None: the paper's value for the dataset's family (MuJoCo and others 3, AntMaze 10, Kitchen and Adroit 0.5)"""
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
    """the dropout rate after each hidden activation of the actor. None: the paper's value for the dataset's family (0.1 on Kitchen and Adroit, else 0)"""
    actor_lr_schedule: Literal["cosine", "constant"] = "cosine"
    """`cosine` decays the actor learning rate to 0 over its training steps, as the official code does"""
    reward_normalization: Literal["auto", "none", "locomotion", "antmaze"] = "auto"
    """`locomotion`: r / (max - min episode return) * 1000; `antmaze`: r - 1; `auto`: pick by dataset family, else `none`"""
    state_dependent_std: bool = False
    """if toggled, the actor's log-std is a function of the state (the paper learns one state-independent vector)"""
    policy_extraction: Literal["concurrent", "posthoc", "both"] = "concurrent"
    """`concurrent`: train the actor alongside V/Q (the paper); `posthoc`: train it afterwards against the frozen final V/Q"""
    posthoc_steps: Optional[int] = None
    """the gradient steps of the post-hoc actor; None means --total-steps"""
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
    """print and log training metrics every this many gradient steps"""


# D4RL's reference returns (random, expert), for datasets with none (Minari's mujoco/*-v0): scores then mean what they meant in D4RL
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
# The paper's (expectile, temperature, actor dropout) per family, from the official configs; other datasets get MuJoCo's, like its default config
PAPER_SETTINGS = {
    "MuJoCo": (0.7, 3.0, 0.0),
    "AntMaze": (0.9, 10.0, 0.0),
    "Kitchen": (0.7, 0.5, 0.1),
    "Adroit": (0.7, 0.5, 0.1),
}


def resolve_paper_settings(args: Args) -> Tuple[Args, str]:
    """The paper's settings for the dataset's family where --expectile, --temperature, --actor-dropout are None and rewards `auto`; and a line saying which."""
    family = dataset_family(args.env_id).replace("PointMaze", "MuJoCo")  # the paper has no PointMaze settings
    rewards = {
        "auto": "locomotion" if args.env_id.startswith("mujoco/") else "antmaze" if family == "AntMaze" else "none"
    }.get(args.reward_normalization, args.reward_normalization)
    names = ("expectile", "temperature", "actor_dropout")
    given = [getattr(args, n) is not None for n in names]
    args = replace(
        args, reward_normalization=rewards, **{n: v for n, v, g in zip(names, PAPER_SETTINGS[family], given) if not g}
    )
    words = [f"{n.replace('_', ' ')} {getattr(args, n):g}" + (" (given)" if g else "") for n, g in zip(names, given)]
    return args, ", ".join(words) + ("" if all(given) else f" (the paper's {family} settings)")


def validate_args(args: Args) -> None:
    """Reject bad settings before any work is done."""
    positive = (
        "num_seeds",
        "total_steps",
        "batch_size",
        "posthoc_steps",
        "exp_adv_max",
        "actor_lr",
        "critic_lr",
        "value_lr",
        "torch_threads",
        "eval_episodes",
        "final_eval_episodes",
        "log_freq",
    )
    checks = [
        (0.0 < args.expectile < 1.0, f"--expectile must be in (0, 1), got {args.expectile}"),
        *(
            (getattr(args, f) > 0, f"--{f.replace('_', '-')} must be positive, got {getattr(args, f)}")
            for f in positive
            if getattr(args, f) is not None
        ),
        *(
            (getattr(args, f) >= 0, f"--{f.replace('_', '-')} must be >= 0, got {getattr(args, f)}")
            for f in ("temperature", "seed", "eval_freq", "checkpoint_freq")
        ),
        (0.0 <= args.discount <= 1.0, f"--discount must be in [0, 1], got {args.discount}"),
        (0.0 < args.tau <= 1.0, f"--tau must be in (0, 1], got {args.tau}"),
        (
            len(args.hidden_dims) > 0 and min(args.hidden_dims) > 0,
            f"--hidden-dims must be positive sizes, got {args.hidden_dims}",
        ),
        (0.0 <= args.actor_dropout < 1.0, f"--actor-dropout must be in [0, 1), got {args.actor_dropout}"),
        *(
            (
                getattr(args, f) <= EVAL_SEED_BLOCK,
                f"--{f.replace('_', '-')} must be at most {EVAL_SEED_BLOCK}, the evaluation seeds of one training seed, got {getattr(args, f)}",
            )
            for f in ("eval_episodes", "final_eval_episodes")
        ),
        (
            dataset_family(args.env_id).endswith("Maze") or not (args.goal_terminal or args.eval_terminate_at_goal),
            f"--{'goal-terminal' if args.goal_terminal else 'eval-terminate-at-goal'} applies to maze datasets (pointmaze, antmaze) only, got --env-id {args.env_id}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")


# Data -----------------------------------------------------------------------------------------
def load_minari_dataset(dataset_id: str):
    """From the local store, else downloaded; a mistyped id gets the closest stored ids at once; one error line if neither works."""
    import minari

    # gymnasium-robotics holds the maze, Kitchen and Adroit environments; its note on Adroit's rewards is shown for Adroit datasets
    # only, and any failure (not installed, a bad MUJOCO_GL) surfaces, explained, when the evaluation env is built
    with (
        contextlib.suppress(Exception),
        contextlib.nullcontext() if dataset_family(dataset_id) == "Adroit" else contextlib.redirect_stderr(io.StringIO()),
    ):
        import gymnasium_robotics  # noqa: F401
    store = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
    local = list(minari.list_local_datasets())
    close = [] if dataset_id in local else difflib.get_close_matches(dataset_id, local, n=3, cutoff=0.75)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    if dataset_id not in local:
        print(f"{dataset_id} is not in the local Minari store ({store}).{hint} Trying to download it...", flush=True)
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # its retry warnings would bury our one-line error
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as e:  # minari raises many types here: unknown id, no network, offline mode, bad id format
        raise SystemExit(
            f"error: cannot load Minari dataset '{dataset_id}' ({describe(e)})"
            if dataset_id in local
            else f"error: Minari dataset '{dataset_id}' is not in the local store ({store}) and could not be downloaded ({describe(e)}).{hint} "
            "Set MINARI_DATASETS_PATH to use another store, HF_HUB_OFFLINE=1 to fail at once without a network; `minari list local` lists the stored ids."
        ) from None


def flatten_observation(obs, space: gym.Space) -> np.ndarray:
    """(batch, dim) float32; Dict parts concatenated recursively in key (alphabetical) order: the vector of gym.spaces.flatten."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_observation(obs[k], s) for k, s in space.spaces.items()], axis=1)
    return np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)


def stack_observations(observations: list):
    """A list of (possibly nested dict) observations as one batch: an array, or a dict of batches."""
    if isinstance(observations[0], dict):
        return {k: stack_observations([o[k] for o in observations]) for k in observations[0]}
    return np.stack(observations)


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
        return np.arange(self.episode_lengths.sum()) + np.repeat(np.arange(len(self.episode_lengths)), self.episode_lengths)

    @property
    def episode_starts(self) -> np.ndarray:
        """(E,) index of each episode's first transition."""
        return np.concatenate([[0], np.cumsum(self.episode_lengths)[:-1]])

    @property
    def episode_returns(self) -> np.ndarray:
        return np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts)


def flatten_dataset(dataset) -> OfflineData:
    episodes = list(dataset.iterate_episodes())
    if not episodes:
        raise SystemExit(f"error: Minari dataset '{dataset.spec.dataset_id}' has no episodes")
    stack = lambda part, dtype: np.concatenate([np.asarray(part(e), dtype=dtype) for e in episodes])
    return OfflineData(
        observations=stack(lambda e: flatten_observation(e.observations, dataset.observation_space), np.float32),
        actions=stack(lambda e: np.reshape(e.actions, (len(e.rewards), -1)), np.float32),
        rewards=stack(lambda e: e.rewards, np.float32),
        terminations=stack(lambda e: e.terminations, bool),
        truncations=stack(lambda e: e.truncations, bool),
        episode_lengths=np.array([len(e.rewards) for e in episodes], dtype=np.int64),
    )


def subset_episodes(data: OfflineData, episodes: np.ndarray, lengths: np.ndarray) -> OfflineData:
    """The first lengths[i] steps of each of the given episodes, with the observation after each kept step."""
    starts = data.episode_starts
    steps = np.concatenate([np.arange(starts[e], starts[e] + n) for e, n in zip(episodes, lengths)])
    rows = np.concatenate([np.arange(starts[e] + e, starts[e] + e + n + 1) for e, n in zip(episodes, lengths)])
    return OfflineData(
        observations=data.observations[rows],
        actions=data.actions[steps],
        rewards=data.rewards[steps],
        terminations=data.terminations[steps],
        truncations=data.truncations[steps],
        episode_lengths=np.asarray(lengths, dtype=np.int64),
    )


def reward_transform(mode: str, episode_returns: np.ndarray) -> Tuple[float, float]:
    """(scale, shift) such that the training reward is scale * r + shift."""
    return_range = float(episode_returns.max() - episode_returns.min())
    if mode == "locomotion" and return_range <= 0.0:
        raise SystemExit(
            "error: every episode has the same return, so `locomotion` reward normalisation is undefined; use --reward-normalization none"
        )
    return (1000.0 / return_range, 0.0) if mode == "locomotion" else (1.0, -1.0) if mode == "antmaze" else (1.0, 0.0)


def action_bounds(space: gym.Space) -> Tuple[np.ndarray, np.ndarray]:
    if not isinstance(space, gym.spaces.Box):
        raise SystemExit(f"error: IQL needs a continuous (Box) action space, the dataset has {space}")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise SystemExit(f"error: the action space must be bounded, the dataset has {space}")
    return space.low.astype(np.float32).ravel(), space.high.astype(np.float32).ravel()


def to_unit_box(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map dataset actions affinely to [-1, 1], the range of the tanh mean (identity for [-1, 1] boxes), then clip to [-1 + eps, 1 - eps] as the official data loader does."""
    unit = 2.0 * (actions - low) / (high - low) - 1.0
    return np.clip(unit, -1.0 + ACTION_CLIP_EPS, 1.0 - ACTION_CLIP_EPS).astype(np.float32)


def dataset_family(dataset_id: str) -> str:
    """AntMaze, PointMaze, Kitchen, Adroit, or MuJoCo: the paper's locomotion family, and the default for other ids."""
    name = dataset_id.split("/")[1] if dataset_id.count("/") >= 2 else ""
    return (
        "AntMaze"
        if "antmaze" in dataset_id
        else "PointMaze"
        if "pointmaze" in dataset_id
        else "Kitchen"
        if "kitchen" in dataset_id
        else "Adroit"
        if name in ("pen", "hammer", "door", "relocate")
        else "MuJoCo"
    )


def scoring_rule(dataset, dataset_id: str) -> dict:
    """The paper's score per family (success, Kitchen tasks, normalised return) and any evaluation episode length it needs."""
    family = dataset_family(dataset_id)
    if family.endswith("Maze"):
        return {
            "kind": "success",
            "source": "success rate x100: the env's info['success'] at any step",
            "max_episode_steps": None,
        }
    if family == "Kitchen":
        num_tasks = len(dataset.env_spec.kwargs["tasks_to_complete"])
        return {
            "kind": "tasks",
            "num_tasks": num_tasks,
            "source": f"completed tasks / {num_tasks} x100",
            "max_episode_steps": None,
        }
    metadata = dataset.storage.metadata
    env_name = dataset_id.split("/")[1] if dataset_id.count("/") >= 2 else ""
    if metadata.get("ref_min_score") is not None and metadata.get("ref_max_score") is not None:
        ref, source = (float(metadata["ref_min_score"]), float(metadata["ref_max_score"])), "dataset metadata"
    elif env_name in D4RL_REFERENCE_RETURNS:
        ref, source = D4RL_REFERENCE_RETURNS[env_name], f"D4RL reference returns of {env_name}"
    else:
        return {"kind": "none", "source": "none (the dataset carries no reference scores)", "max_episode_steps": None}
    # D4RL's pen references are returns of 100-step episodes; others go with the dataset's spec (Minari's pen: 200)
    d4rl_pen = env_name == "pen" and np.allclose(ref, D4RL_REFERENCE_RETURNS["pen"], rtol=1e-6)
    return {
        "kind": "return",
        "ref_min": ref[0],
        "ref_max": ref[1],
        "source": f"normalised return, references {ref[0]:g} and {ref[1]:g} from {source}",
        "max_episode_steps": 100 if d4rl_pen else None,
    }


def eval_env_kwargs(rule: dict, terminate_at_goal: bool) -> dict:
    """Overrides of the dataset's evaluation environment spec; with terminate_at_goal, D4RL's mazes: the episode ends at the goal."""
    return {
        **({"max_episode_steps": rule["max_episode_steps"]} if rule["max_episode_steps"] else {}),
        **({"continuing_task": False} if terminate_at_goal else {}),
    }


def cut_episodes_at_goal(data: OfflineData) -> OfflineData:
    """D4RL's maze convention: each episode ends, as a termination, at its first goal step (sparse reward 1); the steps after it, spent at or around the goal, are dropped."""
    starts = data.episode_starts
    goal_steps = [np.flatnonzero(data.rewards[start : start + n] >= 1.0) for start, n in zip(starts, data.episode_lengths)]
    reached = np.array([len(g) > 0 for g in goal_steps], dtype=bool)
    lengths = np.array([g[0] + 1 if len(g) else n for g, n in zip(goal_steps, data.episode_lengths)], dtype=np.int64)
    cut = subset_episodes(data, np.arange(len(lengths)), lengths)
    ends = (np.cumsum(lengths) - 1)[reached]
    cut.terminations[ends], cut.truncations[ends] = True, False
    return cut


def plot_dataset_overview(data: OfflineData, dataset_id: str, path: str) -> None:
    """Histograms of the raw data, log counts from 0.5 (a count of 1 shows), integer bins for integer quantities."""
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (data.rewards, f"step rewards ({len(data.rewards):,} steps)", "reward of a step", "steps", "tab:red"),
        (
            data.episode_lengths,
            f"episode lengths ({len(data.episode_lengths):,} episodes)",
            "episode length (steps)",
            "episodes",
            "tab:green",
        ),
        (data.episode_returns, "episode returns", "episode return (sum of the raw rewards)", "episodes", "tab:blue"),
    ]
    for ax, (values, title, xlabel, counted, color) in zip(axes.flat, panels):
        bins, integers = 50, bool(np.all(values == np.round(values)))
        if integers:
            lo, hi = int(values.min()), int(values.max())
            bins = np.arange(lo - 0.5, hi + math.ceil((hi - lo + 1) / 50), math.ceil((hi - lo + 1) / 50))
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True, min_n_ticks=1))
        ax.hist(values, bins=bins, color=color, rwidth=0.8 if integers else None)
        ax.set(title=title, xlabel=xlabel, ylabel=f"{counted} (log scale)", yscale="log", ylim=(0.5, None))
    ends = [int(data.terminations.sum()), int(data.truncations.sum())]
    axes[1, 1].bar_label(axes[1, 1].bar(["terminations", "truncations"], ends, color=["tab:orange", "tab:purple"]))
    axes[1, 1].set(title="how episodes end", ylabel="episodes", ymargin=0.1)
    fig.suptitle(dataset_id)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# Networks -------------------------------------------------------------------------------------
class Ensemble(nn.Module):
    """`members` independent ReLU MLPs (dropout after each hidden activation), each layer one batched matmul of a (members, in, out) weight:
    (members or fewer, batch, in) -> (members, batch, out). Official init: orthogonal (gain sqrt 2; last_gain last), zero biases; member m from generators[m]."""

    def __init__(
        self,
        in_dim: int,
        hidden_dims,
        out_dim: Optional[int],
        members: int,
        generators=None,
        dropout: float = 0.0,
        last_gain: float = math.sqrt(2),
    ):
        super().__init__()
        dims, self.dropout, self.activate_last = (
            [in_dim, *hidden_dims, *([out_dim] if out_dim else [])],
            dropout,
            out_dim is None,
        )
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(members, i, o)) for i, o in zip(dims, dims[1:])])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(members, 1, o)) for o in dims[1:]])
        for i, w in enumerate(self.weights):  # each drawn as nn.Linear holds it, (out, in), then transposed
            gain = last_gain if out_dim and i == len(self.weights) - 1 else math.sqrt(2)
            w.data.copy_(
                torch.stack(
                    [
                        nn.init.orthogonal_(
                            torch.empty(w.shape[2], w.shape[1]), gain, generator=generators[m] if generators else None
                        ).T
                        for m in range(members)
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if len(x) == len(self.weights[0]) else x.repeat_interleave(len(self.weights[0]) // len(x), dim=0)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1 or self.activate_last:
                x = nn.functional.dropout(torch.relu(x), self.dropout, self.training)
        return x.to(
            self.biases[0].dtype
        )  # under --bf16's autocast the matmuls ran in bfloat16; what follows (losses) is float32


def twin_q(
    critic: Ensemble, obs: torch.Tensor, actions: torch.Tensor
) -> torch.Tensor:  # (seeds, 2, batch): seed k's are members 2k, 2k+1
    return critic(torch.cat([obs, actions], dim=-1)).view(len(obs), 2, -1)


class Actor(nn.Module):
    """Gaussian with a tanh-squashed mean (the distribution is not squashed); by default one learned log-std vector.
    A member per seed: observations (members, batch, obs_dim) give a mean and a log-std, each (members, batch, act_dim)."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_dims,
        dropout: float,
        state_dependent_std: bool,
        members: int = 1,
        generators=None,
    ):
        super().__init__()
        self.trunk = Ensemble(obs_dim, hidden_dims, None, members, generators, dropout)
        self.mean = Ensemble(hidden_dims[-1], (), act_dim, members, generators)
        if state_dependent_std:
            self.log_std_layer = Ensemble(hidden_dims[-1], (), act_dim, members, generators, last_gain=1e-3)
        else:
            self.log_std = nn.Parameter(torch.zeros(members, 1, act_dim))

    def forward(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(obs)
        log_std = self.log_std_layer(h) if hasattr(self, "log_std_layer") else self.log_std.expand(len(h), h.shape[1], -1)
        return torch.tanh(self.mean(h)), log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def make_networks(obs_dim: int, act_dim: int, args: Args, seeds: list, policies: list):
    """V, twin critics, their target, an actor per policy; a member per seed (critics: two), drawn from the seed's own stream."""
    inits = [torch.Generator().manual_seed(seed) for seed in seeds]
    value = Ensemble(obs_dim, args.hidden_dims, 1, len(seeds), inits)
    critic = Ensemble(obs_dim + act_dim, args.hidden_dims, 1, 2 * len(seeds), [g for g in inits for _ in range(2)])
    actors = nn.ModuleDict(
        {
            name: Actor(obs_dim, act_dim, args.hidden_dims, args.actor_dropout, args.state_dependent_std, len(seeds), inits)
            for name in policies
        }
    )
    return value, critic, copy.deepcopy(critic).requires_grad_(False), actors


# Losses: small pure functions, each checkable by hand -----------------------------------------
# Each loss is a batch mean summed over seeds (leading axes): the seeds' parameters are disjoint, so each gets the gradients it would alone.
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


# Update steps ---------------------------------------------------------------------------------
def make_optimizer(module: nn.Module, lr: float, tensor_lr: bool = False) -> torch.optim.Adam:
    # fused Adam: one kernel for all of a network's tensors (3x foreach on a CPU); --compile's lr is a tensor: the schedule never recompiles
    return torch.optim.Adam(
        module.parameters(), lr=torch.tensor(lr).to(next(module.parameters())) if tensor_lr else lr, fused=True
    )


Batch = collections.namedtuple(
    "Batch", ["obs", "actions", "rewards", "next_obs", "masks"]
)  # masks: 1 - termination (truncations bootstrap)


class DeviceData:
    """The training data on the training device; minibatches are drawn there, with no host round-trip."""

    def __init__(self, data: OfflineData, rewards: np.ndarray, actions: np.ndarray, device: torch.device, seeds: list):
        self.observations = torch.as_tensor(data.observations, device=device)
        self.obs_rows = torch.as_tensor(data.obs_rows, device=device)
        self.actions = torch.as_tensor(actions, device=device)
        self.rewards = torch.as_tensor(rewards, device=device)
        self.masks = torch.as_tensor(1.0 - data.terminations.astype(np.float32), device=device)
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def sample(self, batch_size: int) -> Batch:
        """A minibatch per seed, each from its own generator: every tensor is (seeds, batch, ...)."""
        i = torch.stack(
            [
                torch.randint(len(self.obs_rows), (batch_size,), device=self.obs_rows.device, generator=g)
                for g in self.generators
            ]
        )
        rows = self.obs_rows[i]
        return Batch(self.observations[rows], self.actions[i], self.rewards[i], self.observations[rows + 1], self.masks[i])


def update_value_and_critic(batch: Batch, value, critic, target_critic, value_opt, critic_opt, args: Args):
    """V then Q, in the official order; returns metrics and the advantage Q_target - V_new for the actor."""
    with torch.no_grad():
        q_target = twin_q(target_critic, batch.obs, batch.actions).min(dim=1).values
    v = value(batch.obs).squeeze(-1)
    v_loss = expectile_loss(q_target - v, args.expectile)
    value_opt.zero_grad(set_to_none=True)
    v_loss.backward()
    value_opt.step()

    # The actor and the Q target both use the freshly updated V, as the official code does.
    with torch.no_grad():
        v_new, v_next = value(torch.cat([batch.obs, batch.next_obs], dim=1)).squeeze(-1).chunk(2, dim=1)
        td_target = batch.rewards + args.discount * batch.masks * v_next
    q = twin_q(critic, batch.obs, batch.actions)
    q_loss = critic_loss(q, td_target)
    critic_opt.zero_grad(set_to_none=True)
    q_loss.backward()
    critic_opt.step()
    with torch.no_grad():  # Polyak averaging of the target critics, one fused op for all tensors
        torch._foreach_lerp_(list(target_critic.parameters()), list(critic.parameters()), args.tau)
    metrics = torch.stack(
        [v_loss.detach() / len(v), q_loss.detach() / len(v), v.detach().mean(), q.detach().mean()]
    )  # means over seeds
    return metrics, q_target - v_new


def update_actor(batch: Batch, adv: torch.Tensor, actor: Actor, optimizer, scheduler, args: Args):
    weights = awr_weights(adv, args.temperature, args.exp_adv_max)
    loss = actor_loss(gaussian_log_prob(*actor(batch.obs), batch.actions), weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return torch.stack([loss.detach() / len(adv), adv.mean(), weights.mean()])


# Evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def act(actor: Actor, observations: list, obs_space, low, high, device) -> np.ndarray:
    """The policies' mean actions (dropout off), (seeds, envs, act_dim), for observations[k]: a list of env observations per seed."""
    was_training = actor.training
    actor.eval()
    obs = torch.as_tensor(
        np.stack([flatten_observation(stack_observations(o), obs_space) for o in observations]), device=device
    )
    mean = actor(obs)[0].cpu().numpy()
    actor.train(was_training)
    return np.clip(low + (mean + 1.0) * 0.5 * (high - low), low, high)


def evaluate(
    actor: Actor, make_env, num_episodes: int, first_seeds: list, obs_space, low, high, device, video_dir=None
) -> list:
    """Per seed k, num_episodes episodes of its policy, one per env (env seeds first_seeds[k] + i), mean actions; one policy call
    per step serves every env of every seed, and only unfinished envs step. Per seed: the returns, successes and completed tasks."""
    shape = (len(first_seeds), num_episodes)
    envs = [[make_env(render=video_dir is not None and k == i == 0) for i in range(num_episodes)] for k in range(shape[0])]
    if video_dir is not None:
        envs[0][0] = gym.wrappers.RecordVideo(envs[0][0], video_dir, episode_trigger=lambda e: e == 0, disable_logger=True)
    observations = [[env.reset(seed=seed + i)[0] for i, env in enumerate(row)] for seed, row in zip(first_seeds, envs)]
    returns, successes, tasks = np.zeros(shape), np.zeros(shape, bool), np.zeros(shape, int)
    active = [(k, i) for k in range(shape[0]) for i in range(num_episodes)]
    while active:
        actions, still_active = (
            act(actor, observations, obs_space, low, high, device),
            [],
        )  # a finished env keeps its last observation
        for k, i in active:
            observations[k][i], reward, terminated, truncated, info = envs[k][i].step(
                actions[k, i].reshape(envs[k][i].action_space.shape)
            )
            returns[k, i] += reward
            successes[k, i] |= bool(info.get("success", False))
            tasks[k, i] = max(tasks[k, i], len(info.get("episode_task_completions", ())))
            if not (terminated or truncated):
                still_active.append((k, i))
        active = still_active
    for env in sum(envs, []):
        env.close()
    return list(zip(returns, successes, tasks))


def score_summary(episodes, rule: dict) -> dict:
    """Return and score statistics over episodes, scored by the family's rule (see scoring_rule)."""
    returns, successes, tasks = episodes
    kind = rule["kind"]
    scores = (
        100.0 * successes
        if kind == "success"
        else 100.0 * tasks / rule["num_tasks"]
        if kind == "tasks"
        else 100.0 * (returns - rule["ref_min"]) / (rule["ref_max"] - rule["ref_min"])
        if kind == "return"
        else None
    )
    summary = {"return_mean": float(returns.mean()), "return_std": float(returns.std()), "num_episodes": len(returns)}
    return {
        **summary,
        "score_mean": None if scores is None else float(scores.mean()),
        "score_std": None if scores is None else float(scores.std()),
    }


def over_seeds(results: list, seeds: list) -> dict:
    """One seed's summary as it is; for several, the mean and std over seeds of each seed's mean, and each seed's own under `seeds`."""
    if len(results) == 1:
        return results[0]
    stats = {
        f"{q}_{f.__name__}": None if results[0][f"{q}_mean"] is None else float(f([r[f"{q}_mean"] for r in results]))
        for q in ("return", "score")
        for f in (np.mean, np.std)
    }
    return {
        **stats,
        "num_episodes": results[0]["num_episodes"],
        "num_seeds": len(results),
        "seeds": [{"seed": s, **r} for s, r in zip(seeds, results)],
    }


def describe(e: Exception) -> str:  # an exception in one line
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__


def check_eval_env(make_env, actor: Actor, capture_video: bool, obs_space, low, high, device) -> int:
    """Build one evaluation env (a frame rendered for videos) and act once, to fail before training; its episode length."""
    try:
        env = make_env(render=capture_video)
        obs = env.reset(seed=0)[0]
        if capture_video and env.render() is None:
            raise RuntimeError("render() returned no frame")
    except Exception as e:
        raise SystemExit(
            f"error: cannot build the dataset's evaluation environment ({describe(e)}): install the package that provides it"
            + (
                "; without a display install libosmesa6 and set MUJOCO_GL=osmesa, or leave out --capture-video"
                if capture_video
                else ""
            )
        ) from None
    try:
        env.step(act(actor, [[obs]], obs_space, low, high, device)[0, 0].reshape(env.action_space.shape))
    except Exception as e:
        raise SystemExit(
            f"error: the policy cannot act in the dataset's evaluation environment ({describe(e)}): its spaces differ from the dataset's"
        ) from None
    env.close()
    return env.spec.max_episode_steps


# Run folders, checkpoints, resuming -----------------------------------------------------------
# What `--resume` and `--eval-only` may change: logging and resources, never the algorithm or the data.
MAY_CHANGE_ON_RESUME = (
    "track",
    "wandb_project_name",
    "wandb_entity",
    "log_freq",
    "checkpoint_freq",
    "capture_video",
    "save_model",
)


def make_run_dir(run_dir: str) -> str:
    try:
        return os.makedirs(run_dir) or run_dir
    except OSError as e:
        raise SystemExit(
            f"error: cannot create the run folder {run_dir} ({describe(e)}); give a writable --runs-dir"
        ) from None


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Written to a temporary file, flushed, then renamed: a crash mid-write leaves the previous file whole."""
    with open(path + ".tmp", "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(
            f"error: no checkpoint at {path} (the run stopped before its first checkpoint, or ran with --checkpoint-freq 0)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read the checkpoint {path} ({describe(e)}): it is truncated or corrupt") from None


def stored_args(given: Args, stored: dict, may_change, named: Optional[set] = None) -> Args:
    """A saved run's arguments, with those of `may_change` the user gave; any other flag that differs is refused."""
    fields = Args.__dataclass_fields__
    if set(stored) != set(fields):
        raise SystemExit("error: that checkpoint was written by another script, or another version of this one")
    merged = {}
    for name, field in fields.items():
        value, old = getattr(given, name), tuple(stored[name]) if isinstance(stored[name], list) else stored[name]
        is_named = name in named if named is not None else value != field.default  # None: a call from Python, no command line
        if name in ("resume", "eval_only") or (name in may_change and is_named):
            merged[name] = value
        elif not is_named or value == old:
            merged[name] = old
        else:
            raise SystemExit(
                f"error: --{name.replace('_', '-')} {value} differs from the run's {old}; a saved run keeps the arguments that define it (start a new run instead)"
            )
    return Args(**merged)


def rng_states(generators: list) -> dict:  # numpy's and Python's generators draw nothing in training: not saved
    return {
        "minibatches": [g.get_state() for g in generators],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict, generators: list) -> None:
    for generator, state in zip(generators, states["minibatches"], strict=True):
        generator.set_state(state)
    torch.set_rng_state(states["torch"])
    torch.cuda.set_rng_state_all(states["cuda"])  # none saved without CUDA


def catch_stop_signals(catch: bool = True) -> list:
    """SIGTERM and SIGINT only note the signal, so the loop can checkpoint first; catch=False restores the defaults."""
    received = []
    for sig, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
        signal.signal(sig, (lambda signum, frame: received.append(signum)) if catch else default)
    return received


# Training -------------------------------------------------------------------------------------
def main(args: Args, named_flags: Optional[set] = None) -> dict:  # named_flags: those given on the command line
    saved_run = args.resume or args.eval_only
    if args.resume and os.path.exists(os.path.join(args.resume, "summary.json")):
        print(f"{args.resume} has finished (its summary.json is written); nothing to resume")
        return json.load(open(os.path.join(args.resume, "summary.json")))
    if saved_run:
        model = os.path.join(saved_run, "model.pt")
        checkpoint = load_checkpoint(
            model if args.eval_only and os.path.exists(model) else os.path.join(saved_run, "checkpoint.pt")
        )
        args, settings = (
            stored_args(
                args,
                checkpoint["args"],
                MAY_CHANGE_ON_RESUME + (("final_eval_episodes", "cuda", "torch_threads") if args.eval_only else ()),
                named_flags,
            ),
            "the run's stored settings",
        )
    else:
        args, settings = resolve_paper_settings(args)
    validate_args(args)
    dataset = load_minari_dataset(args.env_id)
    low, high = action_bounds(dataset.action_space)
    data = cut_episodes_at_goal(flatten_dataset(dataset)) if args.goal_terminal else flatten_dataset(dataset)
    reward_scale, reward_shift = reward_transform(args.reward_normalization, data.episode_returns)
    rule = scoring_rule(dataset, args.env_id)
    torch.manual_seed(args.seed)  # dropout's masks; every other draw in training has a generator of its own
    torch.set_num_threads(args.torch_threads or torch.get_num_threads())
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    try:  # with --compile, a missing compiler fails here, in one line, not at the first update
        update_vq, update_pi = (
            torch.compile(f, mode="reduce-overhead" if device.type == "cuda" else None) if args.compile else f
            for f in (update_value_and_critic, update_actor)
        )
        if args.compile:
            torch.compile(lambda x: x * 2)(torch.ones(1, device=device))
    except Exception as e:
        raise SystemExit(
            f"error: --compile needs a working torch.compile on {device} ({describe(e)}); leave out --compile"
        ) from None
    train_rewards = (reward_scale * data.rewards + reward_shift).astype(np.float32)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    buffer = DeviceData(data, train_rewards, to_unit_box(data.actions, low, high), device, seeds)
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    policies = ["concurrent", "posthoc"] if args.policy_extraction == "both" else [args.policy_extraction]
    value, critic, target_critic, actors = (net.to(device) for net in make_networks(obs_dim, act_dim, args, seeds, policies))
    actor_steps = {
        "concurrent": args.total_steps,
        "posthoc": args.posthoc_steps or args.total_steps,
    }  # each actor's own updates; its cosine runs over them
    optimizers = {
        "value": make_optimizer(value, args.value_lr),
        "critic": make_optimizer(critic, args.critic_lr),
        **{n: make_optimizer(a, args.actor_lr, args.compile) for n, a in actors.items()},
    }
    # lr_t = lr * (1 + cos(pi * t / steps)) / 2, optax's cosine_decay_schedule as in the official code
    schedulers = {
        n: torch.optim.lr_scheduler.CosineAnnealingLR(optimizers[n], T_max=actor_steps[n])
        for n in actors
        if args.actor_lr_schedule == "cosine"
    }
    networks = {
        "value": value,
        "critic": critic,
        "target_critic": target_critic,
        **{f"actor_{n}": a for n, a in actors.items()},
    }
    stateful = {"networks": networks, "optimizers": optimizers, "schedulers": schedulers}  # everything with a state_dict

    def make_env(render: bool = False):
        return dataset.recover_environment(
            eval_env=True,
            **eval_env_kwargs(rule, args.eval_terminate_at_goal),
            **({"render_mode": "rgb_array"} if render else {}),
        )

    rule["max_episode_steps"] = check_eval_env(
        make_env, actors[policies[0]], args.capture_video, dataset.observation_space, low, high, device
    )
    progress = {
        "phase": "train",
        "step": 0,
        "evaluations": [],
        "train_time_s": 0.0,
        "eval_time_s": 0.0,
        "wall_time_s": 0.0,
        "wandb_id": None,
    }
    if saved_run:
        for group, objects in stateful.items():
            for name, obj in objects.items():
                obj.load_state_dict(checkpoint[group][name])
        if args.resume:
            set_rng_states(checkpoint["rng"], buffer.generators)
        progress = checkpoint["progress"]

    def make_checkpoint() -> dict:
        """Everything to continue as if never stopped, or to use the policies: plain tensors, numbers and strings."""
        return {
            "args": asdict(args),
            "obs_dim": obs_dim,
            "act_dim": act_dim,
            "progress": progress,
            "rng": rng_states(buffer.generators),
            **{group: {name: obj.state_dict() for name, obj in objects.items()} for group, objects in stateful.items()},
            "normalization": {
                "reward_scale": reward_scale,
                "reward_shift": reward_shift,
                "action_low": low.tolist(),
                "action_high": high.tolist(),
            },
        }

    def evaluate_policy(name: str, episodes: int, video_dir=None) -> list:  # a summary per seed
        episodes = evaluate(
            actors[name],
            make_env,
            episodes,
            [EVAL_SEED_BLOCK * seed for seed in seeds],
            dataset.observation_space,
            low,
            high,
            device,
            video_dir,
        )
        return [score_summary(e, rule) for e in episodes]

    def record_videos(run_dir: str) -> None:
        if not args.capture_video:
            return
        for name in policies:  # the first final-evaluation episode again, recorded once the results are safe
            try:
                evaluate_policy(name, 1, video_dir=os.path.join(run_dir, "videos", name))
            except Exception as e:
                print(f"warning: no video of the {name} policy ({describe(e)})")

    if args.eval_only:
        results = {name: over_seeds(evaluate_policy(name, args.final_eval_episodes), seeds) for name in policies}
        print(json.dumps({"run": saved_run, "phase": progress["phase"], "step": progress["step"], "policies": results}))
        record_videos(saved_run)
        return {"policies": results}

    run_name = (
        os.path.basename(os.path.normpath(args.resume))
        if args.resume
        else f"{args.env_id.replace('/', '__')}__{args.exp_name}__{args.seed}{f'-{seeds[-1]}' if len(seeds) > 1 else ''}__{time.time_ns() // 1_000_000}"
    )  # ms: runs started together stay apart
    run_dir = args.resume or make_run_dir(
        os.path.join(args.runs_dir, run_name)
    )  # only now, everything checked, a new run gets a folder
    if not args.resume:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        plot_dataset_overview(data, args.env_id, os.path.join(run_dir, "dataset_overview.png"))
    progress["evaluations"] = [
        r for r in progress["evaluations"] if not r["final"]
    ]  # a stop during the final evaluation redoes it
    with open(os.path.join(run_dir, "evaluations.jsonl"), "w") as f:  # on resume, drop evaluations made after the checkpoint
        f.writelines(json.dumps(record) + "\n" for record in progress["evaluations"])
    print(
        f"{args.env_id}: {len(data.rewards):,} transitions in {len(data.episode_lengths):,} episodes; "
        f"reward normalisation '{args.reward_normalization}' (r * {reward_scale:.4g} + {reward_shift:g}); {settings}; "
        f"score: {rule['source']}, evaluation episodes of {rule['max_episode_steps'] or 'unlimited'} steps"
        + (f"; resuming at {progress['phase']} step {progress['step']}" if args.resume else "")
    )
    if args.track:
        import wandb

        progress["wandb_id"] = wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            config=asdict(args),
            name=run_name,
            dir=run_dir,
            id=progress["wandb_id"],
            resume="allow",
        ).id
        if not args.resume:
            wandb.log({"charts/dataset_overview": wandb.Image(os.path.join(run_dir, "dataset_overview.png"))}, step=0)

    def run_evaluation(name: str, step: int, episodes: int, wandb_step: int, final: bool = False) -> dict:
        start = time.perf_counter()
        per_seed = evaluate_policy(name, episodes)
        progress["eval_time_s"] += time.perf_counter() - start
        records = [
            {"policy": name, "step": step, "final": final, "seed": seed, **r} for seed, r in zip(seeds, per_seed)
        ]  # step: the policy's own updates
        progress["evaluations"] += records
        with open(os.path.join(run_dir, "evaluations.jsonl"), "a") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        result = over_seeds(per_seed, seeds)
        score = "n/a" if result["score_mean"] is None else f"{result['score_mean']:.1f}"
        print(
            f"eval {name} @ {step}: return {result['return_mean']:.1f} +- {result['return_std']:.1f}, score {score} ({episodes} episodes{f' x {len(seeds)} seeds; +- over seeds' if len(seeds) > 1 else ''})"
        )
        if args.track:  # with several seeds, eval/{name}/ holds the mean over seeds (what a sweep should optimise)
            prefix = f"eval/{name}{'_final' if final else ''}/"
            per_seed_logs = {
                f"{prefix}seed_{seed}/{k}": v
                for seed, r in zip(seeds, per_seed)
                for k, v in r.items()
                if len(seeds) > 1 and v is not None
            }
            wandb.log(
                {**{prefix + k: v for k, v in result.items() if k != "seeds" and v is not None}, **per_seed_logs},
                step=wandb_step,
            )
        return result

    sitting_start, wall_before = time.perf_counter(), progress["wall_time_s"]

    def write_checkpoint(path: str) -> None:
        if not all(
            bool(torch.isfinite(p).all()) for net in networks.values() for p in net.parameters()
        ):  # a NaN gradient of a finite loss
            raise SystemExit(
                f"error: the run diverged: the weights became NaN or infinite by {progress['phase']} step {progress['step']}; the last checkpoint before it stays in {run_dir}"
            )
        progress["wall_time_s"] = wall_before + time.perf_counter() - sitting_start
        save_checkpoint(make_checkpoint(), os.path.join(run_dir, path))

    def stop_here(where: str) -> None:  # after SIGTERM or SIGINT: a checkpoint, how to continue, exit code 143 or 130
        write_checkpoint("checkpoint.pt")
        print(f"stopped at {where}; continue with: python {os.path.basename(__file__)} --resume {run_dir}", flush=True)
        raise SystemExit(128 + stop[0])

    value_names, actor_names = (
        ["losses/value_loss", "losses/critic_loss", "charts/v_mean", "charts/q_mean"],
        ["losses/actor_loss", "charts/advantage_mean", "charts/awr_weight_mean"],
    )
    # (phase, steps, W&B step of its step 0, the actor it trains, its metrics); the post-hoc actor learns from the final V and target Q
    phases = [
        (
            "train",
            args.total_steps,
            0,
            "concurrent" if "concurrent" in actors else None,
            value_names + (actor_names if "concurrent" in actors else []),
        )
    ]
    if "posthoc" in actors:
        phases.append(
            (
                "posthoc",
                actor_steps["posthoc"],
                args.total_steps,
                "posthoc",
                [n.replace("/", "/posthoc_") for n in actor_names],
            )
        )
    order = [phase[0] for phase in phases] + ["done"]
    stop = catch_stop_signals()
    try:
        for index, (phase, steps, wandb_offset, policy, names) in enumerate(phases):
            if order.index(progress["phase"]) > index:
                continue
            first_step, phase_start, last = (
                progress["step"] + 1,
                time.perf_counter(),
                (progress["step"], progress["train_time_s"]),
            )
            nonfinite_at = -1  # per metric, the first step it was NaN or infinite (-1: never), kept on the device
            for step in range(first_step, steps + 1):
                tick = time.perf_counter()
                batch = buffer.sample(args.batch_size)
                with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):  # --bf16: the matmuls only (see Ensemble)
                    if phase == "train":
                        # --compile on CUDA: the actor's compiled call starts a new CUDA-graph generation, which overwrites these outputs
                        metrics, adv = (
                            t.clone() if args.compile else t
                            for t in update_vq(
                                batch, value, critic, target_critic, optimizers["value"], optimizers["critic"], args
                            )
                        )
                    else:
                        with torch.no_grad():
                            adv = twin_q(target_critic, batch.obs, batch.actions).min(dim=1).values - value(batch.obs).squeeze(
                                -1
                            )
                    if policy is not None:
                        actor_metrics = update_pi(batch, adv, actors[policy], optimizers[policy], schedulers.get(policy), args)
                        metrics = actor_metrics if phase == "posthoc" else torch.cat([metrics, actor_metrics])
                nonfinite_at = torch.where((nonfinite_at < 0) & ~torch.isfinite(metrics), step, nonfinite_at)
                progress["step"] = step
                progress["train_time_s"] += time.perf_counter() - tick
                log_now = step % args.log_freq == 0 or step in (300, steps)  # an early line: speed and ETA
                stopping = bool(stop)  # read once: a signal may arrive while this step is being wrapped up
                checkpoint_now = stopping or (
                    args.checkpoint_freq > 0 and step % args.checkpoint_freq == 0
                )  # checked for NaN first
                eval_now = policy is not None and args.eval_freq > 0 and step % args.eval_freq == 0 and step < steps
                if (
                    log_now or checkpoint_now or eval_now or step % 1000 == 0
                ) and nonfinite_at.max() >= 0:  # a host sync, every so often
                    first = int(nonfinite_at[nonfinite_at >= 0].min())
                    which = ", ".join(n.split("/")[1] for n, s in zip(names, nonfinite_at.tolist()) if s == first)
                    raise SystemExit(
                        f"error: the run diverged: {which} became NaN or infinite at {phase} step {first}; the last checkpoint before it stays in {run_dir}"
                    )
                if log_now:
                    rate = (step - last[0]) / max(progress["train_time_s"] - last[1], 1e-9)
                    eta = (steps - step) * (time.perf_counter() - phase_start) / (step - first_step + 1)
                    values, last = dict(zip(names, metrics.tolist())), (step, progress["train_time_s"])
                    print(
                        f"{phase} step {step:>8}/{steps} | {rate:7.0f} upd/s | ETA {eta / 60:5.1f} min | "
                        + " ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in values.items())
                    )
                    if args.track:
                        wandb.log({**values, "charts/updates_per_second": rate}, step=wandb_offset + step)
                if eval_now:
                    run_evaluation(policy, step, args.eval_episodes, wandb_offset + step)
                if stopping:
                    stop_here(f"{phase} step {step}")
                if checkpoint_now:
                    write_checkpoint("checkpoint.pt")
            progress.update(phase=order[index + 1], step=0)
        if stop:
            stop_here("the end of training")
        if args.checkpoint_freq > 0:
            write_checkpoint("checkpoint.pt")  # a run stopped during the final evaluation resumes there
        updates = args.total_steps + (actor_steps["posthoc"] if "posthoc" in actors else 0)  # also the last W&B step
        results = {
            name: run_evaluation(name, actor_steps[name], args.final_eval_episodes, updates, final=True) for name in policies
        }
        if stop:
            stop_here("the final evaluation")
        progress["wall_time_s"] = wall_before + time.perf_counter() - sitting_start
        summary = {
            "env_id": args.env_id,
            "run_name": run_name,
            "seed": args.seed,
            "seeds": seeds,
            "policies": results,
            "scoring": rule,
            "reward_normalization": args.reward_normalization,
            "total_steps": args.total_steps,
            "device": str(device),
            "updates_per_second": updates / progress["train_time_s"],
            **{k: progress[k] for k in ("train_time_s", "eval_time_s", "wall_time_s")},
        }
        if args.save_model:  # before summary.json, whose presence means the run is finished
            write_checkpoint("model.pt")
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    finally:
        catch_stop_signals(False)
    record_videos(run_dir)
    if args.track:
        wandb.summary.update({f"final/{name}/{k}": v for name, r in results.items() for k, v in r.items() if k != "seeds"})
        wandb.finish()
    print(
        f"done in {summary['wall_time_s']:.0f} s ({summary['updates_per_second']:.0f} updates/s, {summary['eval_time_s']:.0f} s evaluating); results in {run_dir}"
    )
    return summary


if __name__ == "__main__":  # tyro writes --flag, --flag=value and, for booleans, --no-flag
    main(
        tyro.cli(Args), {a[2:].split("=")[0].replace("-", "_").removeprefix("no_") for a in sys.argv[1:] if a.startswith("--")}
    )
