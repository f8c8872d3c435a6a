"""Every dataset family of the paper, on tiny datasets recorded in the real environments."""

import json

import gymnasium as gym
import minari
import mujoco
import numpy as np
import pytest
import torch

import bc
import iql
from tests.datasets import KITCHEN_TASKS

POINTMAZE, ANTMAZE, KITCHEN, PEN = (
    "D4RL/pointmaze/open-tiny-v0",
    "D4RL/antmaze/umaze-tiny-v0",
    "D4RL/kitchen/tiny-v0",
    "D4RL/pen/tiny-v0",
)
PEN_OTHER_REFS = "D4RL/pen/tiny-other-refs-v0"


def make_env_fn(dataset, dataset_id, terminate_at_goal=False, wrapper=None):
    def make_env(render=False):
        env = iql.make_eval_env(dataset, iql.scoring_rule(dataset, dataset_id), terminate_at_goal)
        return wrapper(env) if wrapper else env

    return make_env


def run_evaluation(actor, dataset_id, episodes=3, **kwargs):
    dataset = minari.load_dataset(dataset_id)
    low, high = iql.action_bounds(dataset.action_space)
    (stats,) = iql.evaluate(
        actor,
        [[make_env_fn(dataset, dataset_id, **kwargs)() for _ in range(episodes)]],
        [0],
        dataset.observation_space,
        low,
        high,
        torch.device("cpu"),
    )
    return stats, iql.score_summary(stats, iql.scoring_rule(dataset, dataset_id))


def test_dict_observations_flatten_in_key_order(minari_store):
    maze = minari.load_dataset(POINTMAZE)
    data = iql.flatten_dataset(maze)
    episode = next(iter(maze.iterate_episodes()))
    assert data.observations.shape[1] == 2 + 2 + 4
    for j in (0, 5, len(episode.rewards)):
        expected = np.concatenate([episode.observations[k][j] for k in ("achieved_goal", "desired_goal", "observation")])
        np.testing.assert_allclose(data.observations[j], expected, rtol=1e-6)

    kitchen = minari.load_dataset(KITCHEN)
    data = iql.flatten_dataset(kitchen)
    episode = next(iter(kitchen.iterate_episodes()))
    tasks = sorted(KITCHEN_TASKS)  # kettle, light switch, microwave, slide cabinet: 7 + 2 + 1 + 1 values
    assert data.observations.shape[1] == 2 * 11 + 59
    expected = np.concatenate(
        [episode.observations[part][t][3] for part in ("achieved_goal", "desired_goal") for t in tasks]
        + [episode.observations["observation"][3]]
    )
    np.testing.assert_allclose(data.observations[3], expected, rtol=1e-6)
    # the environment's own observations flatten the same way
    env = kitchen.recover_environment(eval_env=True)
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(
        iql.flatten_observation(iql.stack_observations([obs]), kitchen.observation_space)[0],
        gym.spaces.flatten(env.observation_space, obs),
        rtol=1e-6,
    )


def test_each_family_gets_the_papers_score(minari_store):
    rules = {
        dataset_id: iql.scoring_rule(minari.load_dataset(dataset_id), dataset_id)
        for dataset_id in (POINTMAZE, ANTMAZE, KITCHEN, PEN, "mujoco/hopper/tiny-v0")
    }
    assert rules[POINTMAZE]["kind"] == rules[ANTMAZE]["kind"] == "success"
    assert rules[KITCHEN]["kind"] == "tasks" and rules[KITCHEN]["num_tasks"] == 4
    assert (rules[PEN]["kind"], rules[PEN]["ref_min"], rules[PEN]["ref_max"]) == ("return", 96.262799, 3076.833)
    assert "dataset metadata" in rules[PEN]["source"]
    assert (
        rules["mujoco/hopper/tiny-v0"]["ref_min"],
        rules["mujoco/hopper/tiny-v0"]["ref_max"],
    ) == iql.D4RL_REFERENCE_RETURNS["hopper"]
    assert (
        iql.resolve_paper_settings(iql.Args(env_id=POINTMAZE))[0].reward_normalization == "none"
    )  # the paper has no pointmaze rule


class GoToGoal(torch.nn.Module):
    """A scripted PointMaze 'actor': push towards desired_goal, damped. Flat obs: achieved(2), desired(2), x, y, vx, vy."""

    def __init__(self, gain):
        super().__init__()
        self.gain = gain

    def forward(self, obs):
        action = self.gain * (obs[..., 2:4] - obs[..., 0:2]) - (self.gain > 0) * obs[..., 6:8]  # obs: (seeds, envs, 8)
        return torch.tanh(action), torch.zeros_like(action)


@pytest.mark.parametrize("terminate_at_goal", [False, True])
def test_pointmaze_success_rate(minari_store, terminate_at_goal):
    (returns, successes, _), summary = run_evaluation(GoToGoal(5.0), POINTMAZE, terminate_at_goal=terminate_at_goal)
    assert summary["score_mean"] == 100.0 and successes.all()
    if terminate_at_goal:  # D4RL's convention: the episode ends at the goal with one reward of 1
        np.testing.assert_array_equal(returns, 1.0)
    else:  # Minari's: the agent stays and collects reward at the goal
        assert np.all(returns > 1.0)
    (returns, successes, _), summary = run_evaluation(GoToGoal(0.0), POINTMAZE, terminate_at_goal=terminate_at_goal)
    assert summary["score_mean"] == 0.0 and not successes.any() and np.all(returns == 0.0)


class OpenMicrowaveOnReset(gym.Wrapper):
    """Puts the microwave door at its goal angle when an episode starts, so that task completes."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        model, data = self.env.unwrapped.model, self.env.unwrapped.data
        data.qpos[model.joint("microwave").qposadr[0]] = -0.75
        mujoco.mj_forward(model, data)
        return obs, info


class StandStill(torch.nn.Module):
    def forward(self, obs):
        return torch.zeros(*obs.shape[:-1], 9), torch.zeros(*obs.shape[:-1], 9)


def test_kitchen_counts_completed_tasks(minari_store):
    (_, _, tasks), summary = run_evaluation(StandStill(), KITCHEN, episodes=2)
    assert tasks.tolist() == [0, 0] and summary["score_mean"] == 0.0
    (_, _, tasks), summary = run_evaluation(StandStill(), KITCHEN, episodes=2, wrapper=OpenMicrowaveOnReset)
    assert tasks.tolist() == [1, 1] and summary["score_mean"] == 25.0  # 1 of the dataset's 4 tasks


@pytest.mark.parametrize(
    "dataset_id, refs, episode_steps", [(PEN, (96.262799, 3076.833), 100), (PEN_OTHER_REFS, (50.0, 5000.0), 200)]
)
def test_pen_episode_length_goes_with_its_reference_scores(dataset_id, refs, episode_steps, minari_store, tmp_path, capsys):
    # D4RL's pen references are returns of 100-step episodes; any other references go with the dataset's own spec (200)
    assert minari.load_dataset(dataset_id).recover_environment(eval_env=True).spec.max_episode_steps == 200
    summary = iql.main(
        iql.Args(
            env_id=dataset_id,
            total_steps=5,
            batch_size=8,
            hidden_dims=(8,),
            eval_freq=0,
            final_eval_episodes=1,
            runs_dir=str(tmp_path),
            cuda=False,
        )
    )
    scoring = summary["scoring"]
    assert (scoring["ref_min"], scoring["ref_max"], scoring["max_episode_steps"]) == (*refs, episode_steps)
    assert (
        "dataset metadata" in scoring["source"] and f"evaluation episodes of {episode_steps} steps" in capsys.readouterr().out
    )


@pytest.mark.parametrize("script", [iql, bc])
@pytest.mark.parametrize("dataset_id", [POINTMAZE, ANTMAZE, KITCHEN, PEN])
def test_both_scripts_run_on_every_family(script, dataset_id, minari_store, tmp_path):
    common = dict(
        env_id=dataset_id,
        total_steps=20,
        batch_size=16,
        hidden_dims=(16, 16),
        eval_freq=0,
        final_eval_episodes=2,
        log_freq=10,
        runs_dir=str(tmp_path),
        cuda=False,
    )
    summary = script.main(script.Args(**common))
    (result,) = summary["policies"].values()
    score, rule = result["score_mean"], summary["scoring"]
    assert 0.0 <= score <= 100.0 or rule["kind"] == "return"
    if rule["kind"] == "success":
        assert score in (0.0, 50.0, 100.0)
    elif rule["kind"] == "tasks":
        assert score % 12.5 == 0.0
    else:
        assert score == pytest.approx(100 * (result["return_mean"] - rule["ref_min"]) / (rule["ref_max"] - rule["ref_min"]))
    run_dir = tmp_path / summary["run_name"]
    assert json.loads((run_dir / "summary.json").read_text())["scoring"] == rule
    if script is iql:  # no algorithm flags: the paper's settings for the family
        expected = {POINTMAZE: (0.7, 3.0, 0.0), ANTMAZE: (0.9, 10.0, 0.0), KITCHEN: (0.7, 0.5, 0.1), PEN: (0.7, 0.5, 0.1)}[
            dataset_id
        ]
        stored = json.loads((run_dir / "args.json").read_text())
        assert (stored["expectile"], stored["temperature"], stored["actor_dropout"]) == expected


def test_explicit_flags_win_over_the_papers_family_settings(minari_store, tmp_path, capsys):
    summary = iql.main(
        iql.Args(
            env_id=ANTMAZE,
            expectile=0.8,
            total_steps=5,
            batch_size=8,
            hidden_dims=(8,),
            eval_freq=0,
            final_eval_episodes=1,
            runs_dir=str(tmp_path),
            cuda=False,
        )
    )
    stored = json.loads((tmp_path / summary["run_name"] / "args.json").read_text())
    assert (stored["expectile"], stored["temperature"], stored["actor_dropout"]) == (0.8, 10.0, 0.0)
    assert "expectile 0.8 (given), temperature 10, actor dropout 0 (the paper's AntMaze settings)" in capsys.readouterr().out
    args, line = iql.resolve_paper_settings(iql.Args(env_id="mujoco/hopper/medium-v0", expectile=0.7, temperature=3.0))
    assert (args.expectile, args.temperature, args.actor_dropout) == (0.7, 3.0, 0.0)  # the README's command, as before


def test_goal_terminal_cuts_episodes_at_the_first_goal_step():
    data = iql.OfflineData(
        observations=np.arange(11, dtype=np.float32)[:, None],
        actions=np.zeros((9, 1), np.float32),
        rewards=np.array([0, 0, 1, 1, 0, 0, 0, 0, 1], np.float32),
        terminations=np.zeros(9, bool),
        truncations=np.array([0, 0, 0, 0, 1, 0, 0, 0, 1], bool),
        episode_lengths=np.array([5, 4]),
    )
    cut = iql.cut_episodes_at_goal(data)
    assert cut.episode_lengths.tolist() == [3, 4]
    assert cut.rewards.tolist() == [0, 0, 1, 0, 0, 0, 1]
    assert cut.terminations.tolist() == [0, 0, 1, 0, 0, 0, 1]
    assert cut.truncations.tolist() == [0] * 7
    assert cut.observations[cut.obs_rows + 1, 0].tolist() == [1, 2, 3, 7, 8, 9, 10]  # s' of the goal step is kept


def test_maze_options_are_rejected_elsewhere(tmp_path):
    for script in (iql, bc):
        for flag, kwargs in (
            ("--goal-terminal", {"goal_terminal": True}),
            ("--eval-terminate-at-goal", {"eval_terminate_at_goal": True}),
        ):
            with pytest.raises(SystemExit) as error:
                script.main(script.Args(env_id="mujoco/hopper/tiny-v0", runs_dir=str(tmp_path), **kwargs))
            assert (
                str(error.value)
                == f"error: {flag} applies to maze datasets (pointmaze, antmaze) only, got --env-id mujoco/hopper/tiny-v0"
            )
    assert not (tmp_path / "runs").exists() and not list(tmp_path.iterdir())


def test_capture_video_writes_a_video(minari_store, tmp_path, renderer):
    summary = iql.main(
        iql.Args(
            env_id=ANTMAZE,
            total_steps=5,
            batch_size=8,
            hidden_dims=(8,),
            eval_freq=0,
            final_eval_episodes=2,
            log_freq=5,
            capture_video=True,
            runs_dir=str(tmp_path),
            cuda=False,
        )
    )
    videos = list((tmp_path / summary["run_name"] / "videos" / "concurrent").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 1000


def test_adroit_note_of_gymnasium_robotics_shows_only_for_adroit_datasets(minari_store, tmp_path):
    from tests.test_iql import run_cli

    note = "environment's reward functions were updated"
    quick = [
        "--total-steps",
        "4",
        "--batch-size",
        "8",
        "--hidden-dims",
        "8",
        "--eval-freq",
        "0",
        "--final-eval-episodes",
        "1",
        "--log-freq",
        "4",
    ]
    maze = run_cli("iql.py", "--env-id", POINTMAZE, *quick, cwd=tmp_path)
    assert maze.returncode == 0 and maze.stderr == ""  # the log holds only the run's own lines
    assert note not in maze.stdout
    pen = run_cli("bc.py", "--env-id", PEN, *quick, cwd=tmp_path)
    assert pen.returncode == 0 and pen.stderr.count(note) == 1
