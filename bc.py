"""Behaviour cloning (BC) and top-k% BC on Minari datasets, in one file.

Copyright (c) 2026 the single-file offline RL authors. MIT License: see LICENSE, or https://opensource.org/license/mit

The baselines of the IQL paper (Kostrikov, Nair & Levine 2021, https://arxiv.org/abs/2110.06169):
BC maximises the log-likelihood of the dataset's actions; "10% BC" does the same on only the
episodes with the top 10% of returns. Same data loading, evaluation, scores and outputs as iql.py.

    python bc.py --env-id mujoco/hopper/medium-v0                     # BC
    python bc.py --env-id mujoco/hopper/medium-v0 --top-fraction 0.1  # 10% BC
    python bc.py --help

Outputs go to runs/{run_name}/: args.json, dataset_overview.png,
evaluations.jsonl, summary.json and (with --save-model) model.pt.
"""

import contextlib
import difflib
import io
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Tuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro


@dataclass
class Args:
    exp_name: Optional[str] = None
    """the name of this experiment (part of the run name); None: `bc`, or `bc_top{percent}` (e.g. bc_top10) below --top-fraction 1"""
    env_id: str = "mujoco/hopper/medium-v0"
    """the Minari dataset id; the policy is evaluated in the dataset's own evaluation environment"""
    seed: int = 1
    """seed of the network, the minibatches and the evaluation episodes (episode i uses seed + i)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, train on the GPU when one is available"""
    torch_threads: Optional[int] = 1
    """CPU threads of torch; 1 keeps runs sharing a machine from slowing each other (torch's default, all cores, made 2 runs on 2 cores 16-35x slower)"""
    track: bool = False
    """if toggled, log the run to Weights & Biases"""
    wandb_project_name: str = "offline-rl"
    """the W&B project"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team); None uses your default entity"""
    capture_video: bool = False
    """if toggled, record the first final-evaluation episode to runs/{run_name}/videos"""
    save_model: bool = False
    """if toggled, save the policy, its optimiser state, the action normalisation and these args to model.pt"""
    runs_dir: str = "runs"
    """the folder under which each run writes runs/{run_name}/"""

    # Algorithm
    top_fraction: float = 1.0
    """train on the episodes with the best returns, this fraction of them (1.0 = plain BC, 0.1 = the paper's 10% BC)"""
    total_steps: int = 1_000_000
    """the number of gradient steps"""
    batch_size: int = 256
    """the minibatch size"""
    actor_lr: float = 3e-4
    """the learning rate of the policy (named as iql.py's actor, so both scripts take the same flags)"""
    hidden_dims: Tuple[int, ...] = (256, 256)
    """the hidden layer sizes of the policy"""
    actor_dropout: float = 0.0
    """the dropout rate after each hidden activation of the policy"""
    actor_lr_schedule: Literal["cosine", "constant"] = "cosine"
    """`cosine` decays the learning rate to 0 over the run, as iql.py's actor does"""
    state_dependent_std: bool = False
    """if toggled, the policy's log-std is a function of the state (default: one learned vector, as in iql.py)"""
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
    """the number of episodes of the final evaluation"""
    log_freq: int = 5_000
    """print and log training metrics every this many gradient steps"""


# D4RL reference returns (random, expert) for datasets that carry no reference scores
# (Minari's mujoco/*-v0 datasets); the scores of these environments then mean what they meant in D4RL.
D4RL_REFERENCE_RETURNS = {
    "halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3),
    "pen": (96.262799, 3076.833), "hammer": (-274.856578, 12794.13), "door": (-56.512833, 2880.569), "relocate": (-6.425911, 4233.878),
}
ACTION_CLIP_EPS = 1e-5
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def validate_args(args: Args) -> None:
    """Reject bad settings before any work is done."""
    checks = [
        (0.0 < args.top_fraction <= 1.0, f"--top-fraction must be in (0, 1], got {args.top_fraction}"),
        (args.total_steps > 0, f"--total-steps must be positive, got {args.total_steps}"),
        (args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}"),
        (args.actor_lr > 0.0, f"--actor-lr must be positive, got {args.actor_lr}"),
        (len(args.hidden_dims) > 0 and min(args.hidden_dims) > 0, f"--hidden-dims must be positive sizes, got {args.hidden_dims}"),
        (0.0 <= args.actor_dropout < 1.0, f"--actor-dropout must be in [0, 1), got {args.actor_dropout}"),
        (args.torch_threads is None or args.torch_threads > 0, f"--torch-threads must be positive, got {args.torch_threads}"),
        (args.eval_freq >= 0, f"--eval-freq must be >= 0, got {args.eval_freq}"),
        *((getattr(args, f) > 0, f"--{f.replace('_', '-')} must be positive, got {getattr(args, f)}") for f in ("eval_episodes", "final_eval_episodes", "log_freq")),
        (dataset_family(args.env_id) == "maze" or not (args.goal_terminal or args.eval_terminate_at_goal),
         f"--{'goal-terminal' if args.goal_terminal else 'eval-terminate-at-goal'} applies to maze datasets (pointmaze, antmaze) only, got --env-id {args.env_id}"),
    ]
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_minari_dataset(dataset_id: str):
    """Load a Minari dataset from the local store, else download it; one clear error line if neither works.
    A mistyped id gets the closest stored ids at once, before any download is tried."""
    import minari

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
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise SystemExit(
            f"error: cannot load Minari dataset '{dataset_id}' ({reason})" if dataset_id in local else
            f"error: Minari dataset '{dataset_id}' is not in the local store ({store}) and could not be downloaded ({reason}).{hint} "
            "Set MINARI_DATASETS_PATH to use another store, HF_HUB_OFFLINE=1 to fail at once without a network; `minari list local` lists the stored ids."
        ) from None


def import_robotics_envs(dataset_id: str) -> None:
    """Import gymnasium-robotics (maze, Kitchen, Adroit envs) at the start. Its import prints a note on Adroit's reward
    functions: shown for Adroit datasets, where it concerns the run, and silenced elsewhere (it came mid-log)."""
    adroit = dataset_id.split("/")[1:2] in (["pen"], ["hammer"], ["door"], ["relocate"])
    with contextlib.suppress(ImportError), contextlib.nullcontext() if adroit else contextlib.redirect_stderr(io.StringIO()):
        import gymnasium_robotics  # noqa: F401  (needed only by the datasets whose environments it holds)


def flatten_observation(obs, space: gym.Space) -> np.ndarray:
    """Flatten a (batched) observation into (batch, dim) float32.

    Dict observations (goal-conditioned datasets) are concatenated in the key order of the
    `gym.spaces.Dict` (alphabetical, e.g. achieved_goal, desired_goal, observation), recursively,
    each part flattened row-major: the same order as `gym.spaces.flatten`.
    """
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_observation(obs[k], s) for k, s in space.spaces.items()], axis=1)
    obs = np.asarray(obs, dtype=np.float32)
    return obs.reshape(len(obs), -1)


def stack_observations(observations: list):
    """A list of (possibly nested dict) observations as one batch: an array, or a dict of batches."""
    if isinstance(observations[0], dict):
        return {k: stack_observations([o[k] for o in observations]) for k in observations[0]}
    return np.stack(observations)


@dataclass
class OfflineData:
    """A Minari dataset flattened once into arrays. Every episode stores its T+1 observations
    back to back, so s' of transition i is the row after s, and no observation is stored twice."""

    observations: np.ndarray  # (N + E, obs_dim) float32
    actions: np.ndarray  # (N, act_dim) float32, raw (as in the dataset)
    rewards: np.ndarray  # (N,) float32, raw
    terminations: np.ndarray  # (N,) bool
    truncations: np.ndarray  # (N,) bool
    episode_lengths: np.ndarray  # (E,) int64

    @property
    def obs_rows(self) -> np.ndarray:
        """(N,) row of each transition's s in `observations`; s' is the next row. Transition j of
        episode e sits at row (start of e) + e + j: each earlier episode has one extra row."""
        return np.arange(self.episode_lengths.sum()) + np.repeat(np.arange(len(self.episode_lengths)), self.episode_lengths)

    @property
    def episode_starts(self) -> np.ndarray:
        """(E,) index of each episode's first transition."""
        return np.concatenate([[0], np.cumsum(self.episode_lengths)[:-1]])

    @property
    def episode_returns(self) -> np.ndarray:
        return np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts)


def flatten_dataset(dataset) -> OfflineData:
    obs_space = dataset.observation_space
    parts = {k: [] for k in ("observations", "actions", "rewards", "terminations", "truncations")}
    lengths = []
    for episode in dataset.iterate_episodes():
        parts["observations"].append(flatten_observation(episode.observations, obs_space))
        parts["actions"].append(np.asarray(episode.actions, dtype=np.float32).reshape(len(episode.rewards), -1))
        parts["rewards"].append(np.asarray(episode.rewards, dtype=np.float32))
        parts["terminations"].append(np.asarray(episode.terminations, dtype=bool))
        parts["truncations"].append(np.asarray(episode.truncations, dtype=bool))
        lengths.append(len(episode.rewards))
    if not lengths:
        raise SystemExit(f"error: Minari dataset '{dataset.spec.dataset_id}' has no episodes")
    return OfflineData(**{k: np.concatenate(v) for k, v in parts.items()}, episode_lengths=np.asarray(lengths, dtype=np.int64))


def subset_episodes(data: OfflineData, episodes: np.ndarray, lengths: np.ndarray) -> OfflineData:
    """The first lengths[i] steps of each of the given episodes, with the observation after each kept step."""
    starts = data.episode_starts
    steps = np.concatenate([np.arange(starts[e], starts[e] + n) for e, n in zip(episodes, lengths)])
    rows = np.concatenate([np.arange(starts[e] + e, starts[e] + e + n + 1) for e, n in zip(episodes, lengths)])
    return OfflineData(
        observations=data.observations[rows], actions=data.actions[steps], rewards=data.rewards[steps],
        terminations=data.terminations[steps], truncations=data.truncations[steps], episode_lengths=np.asarray(lengths, dtype=np.int64),
    )


def top_episodes(data: OfflineData, fraction: float) -> Tuple[OfflineData, float]:
    """The best ceil(fraction * episodes) episodes by undiscounted return (at least one), and the
    lowest kept return. Ties go to the earlier episode; kept episodes stay in dataset order."""
    returns = data.episode_returns
    # round() first so that e.g. 0.7 * 10 = 7.000000000000001 keeps 7 episodes, not 8
    count = max(1, math.ceil(round(fraction * len(returns), 9)))
    kept = np.sort(np.argsort(-returns, kind="stable")[:count])
    subset = subset_episodes(data, kept, data.episode_lengths[kept])
    return subset, float(returns[kept].min())


def action_bounds(space: gym.Space) -> Tuple[np.ndarray, np.ndarray]:
    if not isinstance(space, gym.spaces.Box):
        raise SystemExit(f"error: IQL needs a continuous (Box) action space, the dataset has {space}")
    low, high = space.low.astype(np.float32).ravel(), space.high.astype(np.float32).ravel()
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise SystemExit(f"error: the action space must be bounded, the dataset has {space}")
    return low, high


def to_unit_box(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map dataset actions affinely to [-1, 1], the range of the tanh mean (identity for [-1, 1] boxes),
    then clip to [-1 + eps, 1 - eps] as the official data loader does."""
    unit = 2.0 * (actions - low) / (high - low) - 1.0
    return np.clip(unit, -1.0 + ACTION_CLIP_EPS, 1.0 - ACTION_CLIP_EPS).astype(np.float32)


def dataset_family(dataset_id: str) -> str:
    """`maze` (PointMaze, AntMaze), `kitchen`, or `return` for everything scored by normalised return."""
    if "antmaze" in dataset_id or "pointmaze" in dataset_id:
        return "maze"
    return "kitchen" if "kitchen" in dataset_id else "return"


def scoring_rule(dataset, dataset_id: str) -> dict:
    """How an episode is scored, as the paper does per family: success x100 for mazes, completed
    tasks / number of the dataset's tasks x100 for Kitchen, else the normalised return with the
    dataset's reference scores or, when it has none, D4RL's."""
    family = dataset_family(dataset_id)
    if family == "maze":
        return {"kind": "success", "source": "success rate x100: the env's info['success'] at any step"}
    if family == "kitchen":
        num_tasks = len(dataset.env_spec.kwargs["tasks_to_complete"])
        return {"kind": "tasks", "num_tasks": num_tasks, "source": f"completed tasks / {num_tasks} x100"}
    metadata = dataset.storage.metadata
    if metadata.get("ref_min_score") is not None and metadata.get("ref_max_score") is not None:
        ref, source = (float(metadata["ref_min_score"]), float(metadata["ref_max_score"])), "dataset metadata"
    else:
        env_name = dataset_id.split("/")[1] if dataset_id.count("/") >= 2 else ""
        if env_name not in D4RL_REFERENCE_RETURNS:
            return {"kind": "none", "source": "none (the dataset carries no reference scores)"}
        ref, source = D4RL_REFERENCE_RETURNS[env_name], f"D4RL reference returns of {env_name}"
    return {"kind": "return", "ref_min": ref[0], "ref_max": ref[1], "source": f"normalised return, {source}"}


def eval_env_kwargs(dataset_id: str, terminate_at_goal: bool) -> dict:
    """Overrides of the dataset's evaluation environment spec."""
    kwargs = {}
    if dataset_id.split("/")[1:2] == ["pen"]:
        # D4RL's pen reference scores are returns of 100-step episodes; Minari's spec says 200
        kwargs["max_episode_steps"] = 100
    if terminate_at_goal:
        kwargs["continuing_task"] = False  # D4RL's mazes: the episode ends at the goal
    return kwargs


def cut_episodes_at_goal(data: OfflineData) -> OfflineData:
    """D4RL's maze convention: each episode ends, as a termination, at its first goal step (sparse
    reward 1); the steps after it, spent at or around the goal, are dropped."""
    starts = data.episode_starts
    lengths, reached = data.episode_lengths.copy(), np.zeros(len(starts), bool)
    for e, (start, length) in enumerate(zip(starts, data.episode_lengths)):
        goal_steps = np.flatnonzero(data.rewards[start : start + length] >= 1.0)
        if len(goal_steps):
            lengths[e], reached[e] = goal_steps[0] + 1, True
    cut = subset_episodes(data, np.arange(len(lengths)), lengths)
    ends = np.cumsum(lengths) - 1
    cut.terminations[ends[reached]] = True
    cut.truncations[ends[reached]] = False
    return cut


def plot_dataset_overview(data: OfflineData, dataset_id: str, path: str) -> None:
    """Histograms of the raw data: what the dataset really holds, before any normalisation. Counts are on a log scale
    from 0.5, so that a count of 1 still shows; integer quantities get bins centred on integers (one per integer or per few)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (data.rewards, f"step rewards ({len(data.rewards):,} steps)", "reward of a step", "steps", "tab:red"),
        (data.episode_lengths, f"episode lengths ({len(data.episode_lengths):,} episodes)", "episode length (steps)", "episodes", "tab:green"),
        (data.episode_returns, "episode returns", "episode return (sum of the raw rewards)", "episodes", "tab:blue"),
    ]
    for ax, (values, title, xlabel, counted, color) in zip(axes.flat, panels):
        bins, integers = 50, bool(np.all(values == np.round(values)))
        if integers:
            lo, hi = int(values.min()), int(values.max())
            bins = np.arange(lo - 0.5, hi + math.ceil((hi - lo + 1) / 50), math.ceil((hi - lo + 1) / 50))
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))
        ax.hist(values, bins=bins, color=color, rwidth=0.8 if integers else None)
        ax.set(title=title, xlabel=xlabel, ylabel=f"{counted} (log scale)", yscale="log", ylim=(0.5, None))
    ends = [int(data.terminations.sum()), int(data.truncations.sum())]
    axes[1, 1].bar_label(axes[1, 1].bar(["terminations", "truncations"], ends, color=["tab:orange", "tab:purple"]))
    axes[1, 1].set(title="how episodes end", ylabel="episodes", ymargin=0.1)
    fig.suptitle(dataset_id)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)



# ---------------------------------------------------------------------------------------------
# Networks and loss
# ---------------------------------------------------------------------------------------------
def orthogonal_linear(in_dim: int, out_dim: int, gain: float) -> nn.Linear:
    """The official code initialises every layer orthogonally with zero biases."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(in_dim: int, hidden_dims, out_dim: Optional[int], dropout: float = 0.0) -> nn.Sequential:
    """ReLU MLP; dropout after each hidden activation; no output layer when out_dim is None."""
    layers, dim = [], in_dim
    for h in hidden_dims:
        layers += [orthogonal_linear(dim, h, math.sqrt(2)), nn.ReLU()]
        if dropout > 0.0:
            layers.append(nn.Dropout(dropout))
        dim = h
    if out_dim is not None:
        layers.append(orthogonal_linear(dim, out_dim, math.sqrt(2)))
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Diagonal Gaussian with a tanh-squashed mean (the distribution itself is not squashed) and,
    by default, a learned state-independent log-std clipped to [-5, 2], as in the official code."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims, dropout: float, state_dependent_std: bool):
        super().__init__()
        self.trunk = mlp(obs_dim, hidden_dims, None, dropout)
        self.mean = orthogonal_linear(hidden_dims[-1], act_dim, 1.0)
        if state_dependent_std:
            self.log_std_layer = orthogonal_linear(hidden_dims[-1], act_dim, 1e-3)
        else:
            self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(obs)
        log_std = self.log_std_layer(h) if hasattr(self, "log_std_layer") else self.log_std.expand(len(obs), -1)
        return torch.tanh(self.mean(h)), log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log N(actions; mean, exp(log_std)^2), summed over action dimensions."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def bc_loss(log_prob: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the dataset actions."""
    return -log_prob.mean()



# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(actor: Actor, make_env, num_episodes: int, seed: int, obs_space, low, high, device, video_dir=None):
    """One episode per sub-environment (seeds seed + i), with the mean action. Returns, per episode,
    the undiscounted return, whether info['success'] was ever true, and the most tasks completed.

    Only unfinished sub-environments are stepped: a Gymnasium vector env would auto-reset finished
    ones and keep simulating episodes we then throw away. The policy runs once per step for all.
    """
    envs = [make_env(render=video_dir is not None and i == 0) for i in range(num_episodes)]
    if video_dir is not None:
        envs[0] = gym.wrappers.RecordVideo(envs[0], video_dir, episode_trigger=lambda e: e == 0, disable_logger=True)
    observations = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    returns, successes, tasks = np.zeros(num_episodes), np.zeros(num_episodes, bool), np.zeros(num_episodes, int)
    active = list(range(num_episodes))
    was_training = actor.training
    actor.eval()
    while active:
        obs = torch.as_tensor(flatten_observation(stack_observations([observations[i] for i in active]), obs_space), device=device)
        mean = actor(obs)[0].cpu().numpy()
        actions = np.clip(low + (mean + 1.0) * 0.5 * (high - low), low, high)
        still_active = []
        for i, action in zip(active, actions):
            observations[i], reward, terminated, truncated, info = envs[i].step(action.reshape(envs[i].action_space.shape))
            returns[i] += reward
            successes[i] |= bool(info.get("success", False))
            tasks[i] = max(tasks[i], len(info.get("episode_task_completions", ())))
            if not (terminated or truncated):
                still_active.append(i)
        active = still_active
    actor.train(was_training)
    for env in envs:
        env.close()
    return returns, successes, tasks


def score_summary(episodes, rule: dict) -> dict:
    """Return and score statistics over episodes, scored by the family's rule (see scoring_rule)."""
    returns, successes, tasks = episodes
    summary = {"return_mean": float(returns.mean()), "return_std": float(returns.std()), "num_episodes": len(returns)}
    if rule["kind"] == "success":
        scores = 100.0 * successes
    elif rule["kind"] == "tasks":
        scores = 100.0 * tasks / rule["num_tasks"]
    elif rule["kind"] == "return":
        scores = 100.0 * (returns - rule["ref_min"]) / (rule["ref_max"] - rule["ref_min"])
    else:
        return {**summary, "score_mean": None, "score_std": None}
    return {**summary, "score_mean": float(scores.mean()), "score_std": float(scores.std())}



# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    validate_args(args)
    import_robotics_envs(args.env_id)
    dataset = load_minari_dataset(args.env_id)
    low, high = action_bounds(dataset.action_space)
    data = flatten_dataset(dataset)
    if args.goal_terminal:
        data = cut_episodes_at_goal(data)
    kept, return_threshold = top_episodes(data, args.top_fraction)
    rule = scoring_rule(dataset, args.env_id)

    # Everything is valid: only now does the run get a folder.
    if args.exp_name is None:
        args.exp_name = "bc" if args.top_fraction == 1.0 else f"bc_top{100 * args.top_fraction:g}"
    run_name = f"{args.env_id.replace('/', '__')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.runs_dir, run_name)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    plot_dataset_overview(data, args.env_id, os.path.join(run_dir, "dataset_overview.png"))
    selection = {
        "top_fraction": args.top_fraction,
        "episodes_kept": len(kept.episode_lengths),
        "steps_kept": len(kept.rewards),
        "return_threshold": return_threshold,
    }
    print(
        f"{args.env_id}: {len(data.rewards):,} transitions in {len(data.episode_lengths):,} episodes; "
        f"top {args.top_fraction:g} keeps {selection['episodes_kept']:,} episodes ({selection['steps_kept']:,} steps) "
        f"with return >= {return_threshold:.4g}; score: {rule['source']}"
    )
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=run_name, dir=run_dir)
        wandb.log({"charts/dataset_overview": wandb.Image(os.path.join(run_dir, "dataset_overview.png"))}, step=0)
        wandb.summary.update({f"data/{k}": v for k, v in selection.items()})

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # Only s and a are needed: the minibatches are drawn on the device, with no host round-trip.
    observations = torch.as_tensor(kept.observations, device=device)
    obs_rows = torch.as_tensor(kept.obs_rows, device=device)
    actions = torch.as_tensor(to_unit_box(kept.actions, low, high), device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]

    actor = Actor(obs_dim, act_dim, args.hidden_dims, args.actor_dropout, args.state_dependent_std).to(device)
    optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, fused=True)
    # lr_t = lr * (1 + cos(pi * t / steps)) / 2, like iql.py's actor
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.total_steps) if args.actor_lr_schedule == "cosine" else None

    def make_env(render: bool = False):
        kwargs = eval_env_kwargs(args.env_id, args.eval_terminate_at_goal)
        return dataset.recover_environment(eval_env=True, **kwargs, **({"render_mode": "rgb_array"} if render else {}))

    def run_evaluation(step: int, episodes: int, final: bool = False) -> dict:
        video_dir = os.path.join(run_dir, "videos", "bc") if final and args.capture_video else None
        episode_stats = evaluate(actor, make_env, episodes, args.seed, dataset.observation_space, low, high, device, video_dir)
        result = score_summary(episode_stats, rule)
        with open(os.path.join(run_dir, "evaluations.jsonl"), "a") as f:
            f.write(json.dumps({"policy": "bc", "step": step, "final": final, **result}) + "\n")
        score = "n/a" if result["score_mean"] is None else f"{result['score_mean']:.1f}"
        print(f"eval bc @ {step}: return {result['return_mean']:.1f} +- {result['return_std']:.1f}, score {score} ({episodes} episodes)")
        if args.track:
            prefix = "eval/bc_final/" if final else "eval/bc/"
            wandb.log({prefix + k: v for k, v in result.items() if v is not None}, step=step)
        return result

    start = time.time()
    last = (0, start)
    for step in range(1, args.total_steps + 1):
        i = torch.randint(len(obs_rows), (args.batch_size,), device=device, generator=generator)
        loss = bc_loss(gaussian_log_prob(*actor(observations[obs_rows[i]]), actions[i]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if step % args.log_freq == 0 or step == args.total_steps:
            now = time.time()
            rate = (step - last[0]) / (now - last[1])
            eta = (args.total_steps - step) * (now - start) / step
            loss_value = loss.item()  # the only host sync, on logging steps
            print(f"step {step:>8}/{args.total_steps} | {rate:7.0f} upd/s | ETA {eta / 60:5.1f} min | bc_loss {loss_value:.4g}")
            if args.track:
                wandb.log({"losses/bc_loss": loss_value, "charts/updates_per_second": rate}, step=step)
            last = (step, now)
        if args.eval_freq and step % args.eval_freq == 0 and step < args.total_steps:
            run_evaluation(step, args.eval_episodes)
    train_time = time.time() - start

    result = run_evaluation(args.total_steps, args.final_eval_episodes, final=True)
    summary = {
        "env_id": args.env_id, "run_name": run_name, "seed": args.seed, "policies": {"bc": result}, "scoring": rule,
        "data_selection": selection, "total_steps": args.total_steps,
        "updates_per_second": args.total_steps / train_time, "wall_time_s": time.time() - start, "device": str(device),
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if args.save_model:
        checkpoint = {
            "args": asdict(args), "obs_dim": obs_dim, "act_dim": act_dim, "actor": actor.state_dict(), "optimizer": optimizer.state_dict(),
            "normalization": {"action_low": low, "action_high": high}, "data_selection": selection,
        }
        torch.save(checkpoint, os.path.join(run_dir, "model.pt"))
    if args.track:
        wandb.summary.update({f"final/bc/{k}": v for k, v in result.items()})
        wandb.finish()
    print(f"done in {summary['wall_time_s']:.0f} s ({summary['updates_per_second']:.0f} updates/s); results in {run_dir}")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
