import ast
import inspect
import json
import math

import minari
import numpy as np
import pytest
import torch
import tyro

import bc
import iql
from tests.test_iql import run_cli


def synthetic_data(returns, lengths):
    """An OfflineData whose episode e has the given length and return, with traceable values."""
    lengths = np.asarray(lengths)
    rewards = np.concatenate([np.full(n, r / n, np.float32) for r, n in zip(returns, lengths)])
    n_rows = lengths.sum() + len(lengths)
    # observation rows carry (episode, position) so a wrong row is visible
    obs = np.concatenate([np.stack([np.full(n + 1, e), np.arange(n + 1)], 1) for e, n in enumerate(lengths)]).astype(
        np.float32
    )
    assert len(obs) == n_rows
    return bc.OfflineData(
        observations=obs,
        actions=np.repeat(np.arange(len(lengths), dtype=np.float32), lengths)[:, None],
        rewards=rewards,
        terminations=np.zeros(lengths.sum(), bool),
        truncations=np.zeros(lengths.sum(), bool),
        episode_lengths=lengths,
    )


@pytest.mark.parametrize(
    "fraction, kept",
    [
        (1.0, [0, 1, 2, 3, 4]),
        (0.4, [1, 2]),  # the two best returns, a tie at 10
        (0.2, [1]),  # one of two tied episodes: the earlier one
        (0.01, [1]),  # rounds to zero: at least one episode is kept
        (0.5, [1, 2, 4]),  # ceil(2.5) = 3
    ],
)
def test_top_episodes_keeps_the_right_ones(fraction, kept):
    data = synthetic_data(returns=[5.0, 10.0, 10.0, 1.0, 7.0], lengths=[3, 2, 4, 1, 2])
    subset, threshold = bc.top_episodes(data, fraction, "episodes")
    assert subset.actions[:, 0].tolist() == np.repeat(kept, data.episode_lengths[kept]).tolist()
    assert subset.episode_lengths.tolist() == data.episode_lengths[kept].tolist()
    assert threshold == pytest.approx(min(data.episode_returns[kept]))
    np.testing.assert_allclose(subset.episode_returns, data.episode_returns[kept], rtol=1e-6)
    # s and s' of every kept transition are consecutive rows of the same episode
    s, s_next = subset.observations[subset.obs_rows], subset.observations[subset.obs_rows + 1]
    assert np.all(s[:, 0] == subset.actions[:, 0]) and np.all(s_next[:, 0] == s[:, 0]) and np.all(s_next[:, 1] == s[:, 1] + 1)


@pytest.mark.parametrize(
    "fraction, by, kept",
    [
        (0.5, "steps", [1]),  # budget int(0.5 * 36) = 18 steps: the best episode (10 steps); 10 + 10 is not below 18
        (0.6, "steps", [1, 3]),  # budget 21: 10, then 20 < 21
        (0.56, "steps", [1]),  # budget 20: Decision Transformer's rule stays strictly below it
        (0.01, "steps", [1]),  # budget 1 step, smaller than the best episode, which is kept anyway
        (1.0, "steps", [0, 1, 2, 3, 4, 5]),  # 100% is all of the data
        (0.5, "episodes", [1, 3, 5]),  # 3 of 6 episodes: 30 of the 36 steps
    ],
)
def test_top_by_steps_is_decision_transformers_rule(fraction, by, kept):
    # the high-return episodes are long, the low-return ones short: the two rules keep different amounts of data
    data = synthetic_data(returns=[1.0, 50.0, 2.0, 40.0, 3.0, 30.0], lengths=[2, 10, 2, 10, 2, 10])
    subset, threshold = bc.top_episodes(data, fraction, by)
    assert subset.actions[:, 0].tolist() == np.repeat(kept, data.episode_lengths[kept]).tolist()
    assert threshold == pytest.approx(min(data.episode_returns[kept]))


def test_top_fraction_counts_without_float_error():
    data = synthetic_data(returns=np.arange(10.0), lengths=[1] * 10)
    assert len(bc.top_episodes(data, 0.7, "episodes")[0].episode_lengths) == 7  # 0.7 * 10 = 7.000000000000001 in floats
    assert len(bc.top_episodes(data, 0.1, "episodes")[0].episode_lengths) == 1
    assert len(bc.top_episodes(data, 0.8, "steps")[0].episode_lengths) == 7  # budget 8 steps, not 7.999...: 7 < 8


def train_bc(env_id, top_fraction, runs_dir, steps=1500, top_by="steps"):
    summary = bc.main(
        bc.Args(
            env_id=env_id,
            top_fraction=top_fraction,
            top_by=top_by,
            total_steps=steps,
            batch_size=64,
            hidden_dims=(32, 32),
            actor_lr=1e-3,
            eval_freq=0,
            final_eval_episodes=4,
            log_freq=500,
            save_model=True,
            runs_dir=str(runs_dir),
            cuda=False,
        )
    )
    checkpoint = torch.load(runs_dir / summary["run_name"] / "model.pt", weights_only=True)
    actor = bc.Actor(checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["args"]["hidden_dims"], 0.0, False)
    actor.load_state_dict(checkpoint["networks"]["actor"])
    return summary, actor


def policy_at(actor, obs):
    """(mean action, P(a > 0)) of the learned Gaussian at obs."""
    with torch.no_grad():
        mean, log_std = actor(torch.as_tensor(obs, dtype=torch.float32)[None, None])  # seed 0, a batch of one
    return mean.item(), 0.5 * (1 + math.erf(mean.item() / (math.exp(log_std.item()) * math.sqrt(2))))


def prob_up(actor, obs):
    return policy_at(actor, obs)[1]


def takes_the_good_action(actor, obs):
    """The evaluated (mean) action lies well inside the good arm's data, U(0.2, 1), and most mass is there."""
    mean, p_up = policy_at(actor, obs)
    return mean > 0.3 and p_up > 0.75


def test_bandit_bc_imitates_the_mixture_top_bc_takes_the_good_arm(minari_store, tmp_path):
    summary, actor = train_bc("toy/bandit/fifty-v0", 1.0, tmp_path)
    assert prob_up(actor, [1.0]) == pytest.approx(0.5, abs=0.15)  # half the mass on each arm, like the data
    assert summary["data_selection"]["episodes_kept"] == 100
    summary, actor = train_bc("toy/bandit/fifty-v0", 0.1, tmp_path, top_by="episodes")
    assert summary["data_selection"] == {
        "top_fraction": 0.1,
        "top_by": "episodes",
        "episodes_kept": 10,
        "steps_kept": 10,
        "return_threshold": 1.0,
    }
    summary, actor = train_bc("toy/bandit/fifty-v0", 0.1, tmp_path)
    # one-step episodes, a budget of 10 steps: Decision Transformer's rule keeps 9 (strictly below)
    assert summary["data_selection"] == {
        "top_fraction": 0.1,
        "top_by": "steps",
        "episodes_kept": 9,
        "steps_kept": 9,
        "return_threshold": 1.0,
    }
    assert takes_the_good_action(actor, [1.0])
    assert summary["policies"]["bc"]["return_mean"] == 1.0


def test_two_step_bc_imitates_the_mixture_top_bc_goes_up_twice(minari_store, tmp_path):
    summary, actor = train_bc("toy/twostep/fifty-v0", 1.0, tmp_path)
    for state in np.eye(3)[:2]:
        assert prob_up(actor, state) == pytest.approx(0.5, abs=0.15)
    summary, actor = train_bc("toy/twostep/fifty-v0", 0.1, tmp_path)
    assert summary["data_selection"]["return_threshold"] == 10.0
    assert takes_the_good_action(actor, np.eye(3)[0]) and takes_the_good_action(actor, np.eye(3)[1])
    assert summary["policies"]["bc"]["return_mean"] == 10.0


# ------------------------------------------------------------------ the two copies stay identical
# Written once per script: what differs between BC and IQL (train: iql.py evaluates the offline policy before its online
# phase). Every other top-level name the two files share is copied.
OWN_CODE = {
    "Args",
    "validate_args",
    "DeviceData",
    "make_learner",
    "compile_updates",
    "train_step",
    "train",
    "final_evaluation",
}
OWN_CODE.add("main")


def top_level_sources(module) -> dict:
    source = inspect.getsource(module)
    return {
        node.name if hasattr(node, "name") else ast.unparse(node.targets[0]): ast.get_source_segment(source, node)
        for node in ast.parse(source).body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign))
    }


def test_shared_code_is_the_same_in_both_files():
    iql_code, bc_code = top_level_sources(iql), top_level_sources(bc)
    shared = (set(iql_code) & set(bc_code)) - OWN_CODE
    # data loading, networks, evaluation, run folders, checkpoints and the training loop are all shared
    for name in (
        "load_minari_dataset",
        "check_finite",
        "Ensemble",
        "Actor",
        "evaluate",
        "make_evaluator",
        "Run",
        "write_checkpoint",
        "open_saved_run",
        "write_summary",
        "gradient_step",
        "open_run_folder",
        "log_metrics",
        "train_phase",
        "finish",
    ):
        assert name in shared, name
    for name in sorted(shared):
        assert iql_code[name] == bc_code[name], f"{name} differs between iql.py and bc.py"


def test_data_and_evaluation_identical_in_both_files(minari_store):
    dataset = minari.load_dataset("mujoco/hopper/tiny-v0")
    data_iql, data_bc = iql.flatten_dataset(dataset), bc.flatten_dataset(dataset)
    for field in ("observations", "obs_rows", "actions", "rewards", "terminations", "truncations", "episode_lengths"):
        np.testing.assert_array_equal(getattr(data_iql, field), getattr(data_bc, field))
    low, high = iql.action_bounds(dataset.action_space)
    np.testing.assert_array_equal(iql.to_unit_box(data_iql.actions, low, high), bc.to_unit_box(data_bc.actions, low, high))
    rule = iql.scoring_rule(dataset, "mujoco/hopper/tiny-v0")
    assert rule == bc.scoring_rule(dataset, "mujoco/hopper/tiny-v0")

    torch.manual_seed(0)
    actor_iql = iql.Actor(11, 3, (32, 32), 0.0, False)
    actor_bc = bc.Actor(11, 3, (32, 32), 0.0, False)
    actor_bc.load_state_dict(actor_iql.state_dict())
    envs = [[dataset.recover_environment(eval_env=True) for _ in range(3)]]
    args = (envs, [7], dataset.observation_space, low, high, torch.device("cpu"))
    (episodes_iql,), (episodes_bc,) = iql.evaluate(actor_iql, *args), bc.evaluate(actor_bc, *args)
    for a, b in zip(episodes_iql, episodes_bc):
        np.testing.assert_array_equal(a, b)
    assert iql.score_summary(episodes_iql, rule) == bc.score_summary(episodes_bc, rule)
    # evaluation is reproducible: the same seed gives the same episodes
    np.testing.assert_array_equal(iql.evaluate(actor_iql, *args)[0][0], episodes_iql[0])


def test_both_scripts_take_the_same_flags_for_the_same_things():
    """One vocabulary: a sweep or a shell loop can pass the policy's and the run's flags to either script."""
    assert set(bc.Args.__dataclass_fields__) - set(iql.Args.__dataclass_fields__) == {
        "top_fraction",
        "top_by",
    }  # bc.py's own flags
    flags = [
        "--actor-lr",
        "1e-3",
        "--actor-dropout",
        "0.1",
        "--actor-lr-schedule",
        "constant",
        "--hidden-dims",
        "64",
        "64",
        "--state-dependent-std",
        "--batch-size",
        "32",
        "--torch-threads",
        "2",
        "--final-eval-episodes",
        "5",
    ]
    parsed = [vars(tyro.cli(script.Args, args=flags)) for script in (iql, bc)]
    for field in (
        "actor_lr",
        "actor_dropout",
        "actor_lr_schedule",
        "hidden_dims",
        "state_dependent_std",
        "batch_size",
        "torch_threads",
    ):
        assert parsed[0][field] == parsed[1][field], field


# ------------------------------------------------------------------ end to end and bad input
def test_cli_runs_end_to_end(minari_store, tmp_path):
    result = run_cli(
        "bc.py",
        "--env-id",
        "mujoco/hopper/tiny-v0",
        "--top-fraction",
        "0.5",
        "--total-steps",
        "50",
        "--batch-size",
        "32",
        "--hidden-dims",
        "32",
        "32",
        "--eval-freq",
        "25",
        "--eval-episodes",
        "2",
        "--final-eval-episodes",
        "3",
        "--log-freq",
        "25",
        "--save-model",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["policies"]) == ["bc"]
    assert set(summary["policies"]["bc"]) == {"return_mean", "return_std", "score_mean", "score_std", "num_episodes"}
    assert summary["policies"]["bc"]["num_episodes"] == 3
    # the default rule is Decision Transformer's, by steps
    kept, _ = bc.top_episodes(bc.flatten_dataset(minari.load_dataset("mujoco/hopper/tiny-v0")), 0.5, "steps")
    selection = summary["data_selection"]
    assert (selection["top_by"], selection["episodes_kept"], selection["steps_kept"]) == (
        "steps",
        len(kept.episode_lengths),
        len(kept.rewards),
    )
    assert (run_dir / "model.pt").exists()
    assert f"top 0.5 by steps keeps {len(kept.episode_lengths)} episodes ({len(kept.rewards)} steps" in result.stdout


def test_an_iql_flag_is_named_as_iql_s_in_one_line(tmp_path):
    assert set(bc.IQL_FLAGS) == set(iql.Args.__dataclass_fields__) - set(bc.Args.__dataclass_fields__)
    for flags in (["--expectile", "0.7"], ["--top-fraction", "0.1", "--policy-extraction=both"]):
        result = run_cli("bc.py", *flags, cwd=tmp_path)
        assert result.returncode == 1 and result.stdout == ""
        (name,) = [f.split("=")[0] for f in flags if f.split("=")[0][2:].replace("-", "_") in bc.IQL_FLAGS]
        assert result.stderr.splitlines() == [f"error: {name} is an iql.py flag: bc.py trains no value function"]


# a run of two gradient steps and one evaluation episode
TWO_STEPS = dict(
    env_id="mujoco/hopper/tiny-v0", total_steps=2, batch_size=8, hidden_dims=(8,), eval_freq=0, final_eval_episodes=1
)
TWO_STEPS["cuda"] = False


def test_run_names_tell_bc_and_top_bc_apart(minari_store, tmp_path, capsys):
    names, data_lines = [], []
    for fraction, exp_name in ((1.0, None), (0.1, None), (0.25, None), (0.1, "mine")):
        summary = bc.main(bc.Args(top_fraction=fraction, exp_name=exp_name, runs_dir=str(tmp_path), **TWO_STEPS))
        names.append(summary["run_name"].split("__")[-3])
        assert json.loads((tmp_path / summary["run_name"] / "args.json").read_text())["exp_name"] == names[-1]
        data_lines.append(capsys.readouterr().out.splitlines()[0])
    assert names == ["bc", "bc_top10", "bc_top25", "mine"]
    episodes = len(bc.flatten_dataset(minari.load_dataset(TWO_STEPS["env_id"])).episode_lengths)
    assert f"; all {episodes} episodes (" in data_lines[0] and "top 0.1 by steps keeps " in data_lines[1]


def test_runs_use_one_torch_thread_unless_told(minari_store, tmp_path):
    """Runs sharing a machine must not fight over its cores: both scripts default to one torch thread."""
    assert iql.Args().torch_threads == 1 and bc.Args().torch_threads == 1
    try:
        torch.set_num_threads(2)
        bc.main(bc.Args(runs_dir=str(tmp_path), **TWO_STEPS))
        assert torch.get_num_threads() == 1
        bc.main(bc.Args(runs_dir=str(tmp_path), torch_threads=2, seed=2, **TWO_STEPS))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-fraction", "0"], "--top-fraction must be in (0, 1]"),
        (["--top-fraction", "1.5"], "--top-fraction must be in (0, 1]"),
    ],
)
def test_bad_top_fraction(flags, message, tmp_path):
    result = run_cli("bc.py", *flags, "--env-id", "does/not/exist-v0", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {message}, got {float(flags[1])}"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--env-id", "mujoco/nothing/here-v0"],
        ["--total-steps", "0"],
        ["--batch-size", "0"],
        ["--env-id", "toy/cartpole/tiny-v0"],
        ["--actor-lr", "-1"],
        ["--eval-episodes", "0"],
    ],
)
def test_rejects_what_iql_rejects_the_same_way(flags, minari_store, tmp_path):
    results = [run_cli(script, *flags, cwd=tmp_path) for script in ("iql.py", "bc.py")]
    assert all(r.returncode != 0 for r in results)
    messages = [r.stderr.strip().splitlines() for r in results]
    assert len(messages[0]) == 1 and messages[0] == messages[1]
    assert not (tmp_path / "runs").exists()


def test_bc_takes_iql_actors_dropout_for_the_family_unless_given():
    """BC's policy is IQL's actor trained without advantage weights: the same network, dropout included."""
    for dataset_id, dropout in (("D4RL/kitchen/mixed-v2", 0.1), ("D4RL/pen/human-v2", 0.1), ("mujoco/hopper/medium-v0", 0.0)):
        assert bc.resolve_settings(bc.Args(env_id=dataset_id)).actor_dropout == dropout
        iql_args, _ = iql.resolve_paper_settings(iql.Args(env_id=dataset_id))
        assert iql_args.actor_dropout == dropout
    assert bc.resolve_settings(bc.Args(env_id="D4RL/kitchen/mixed-v2", actor_dropout=0.0)).actor_dropout == 0.0
    assert bc.resolve_settings(bc.Args(top_fraction=0.1)).exp_name == "bc_top10"
