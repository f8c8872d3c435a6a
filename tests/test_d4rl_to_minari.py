"""benchmarks/d4rl_to_minari.py on files written in D4RL's layout from real Hopper-v5 and HalfCheetah-v5 rollouts."""

import json
import os

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest

import bc
import iql
from benchmarks import d4rl_to_minari as converter

HOPPER_REFERENCES = (-20.272305, 3234.3)


def d4rl_rollouts(env_id: str, rows: int, max_path: int, seed: int = 0) -> dict:
    """What D4RL's collect_data.py records: whole episodes of a sampling policy, each ending at a terminal or, after
    max_path steps, at a timeout (never both), concatenated and cut at `rows`, so the file ends mid-episode."""
    env = gym.make(env_id, max_episode_steps=max_path)
    rng = np.random.default_rng(seed)
    keys = ("observations", "actions", "next_observations", "rewards", "terminals", "timeouts", "logprobs", "qpos", "qvel")
    columns = {key: [] for key in keys}
    while len(columns["rewards"]) < rows:
        obs, _ = env.reset(seed=int(rng.integers(2**31)))
        for t in range(1, max_path + 1):
            qpos, qvel = env.unwrapped.data.qpos.copy(), env.unwrapped.data.qvel.copy()
            action = rng.uniform(-1.02, 1.02, env.action_space.shape)  # D4RL's actions lie slightly outside [-1, 1] at times
            next_obs, reward, terminated, _, _ = env.step(np.clip(action, -1.0, 1.0))
            timeout = t == max_path
            for key, value in zip(
                keys, (obs, action, next_obs, reward, terminated and not timeout, timeout, -1.5, qpos, qvel)
            ):
                columns[key].append(value)
            obs = next_obs
            if terminated or timeout:
                break
    flags = ("terminals", "timeouts")  # dtypes as collect_data.py stores them
    return {key: np.array(value[:rows], dtype=bool if key in flags else np.float32) for key, value in columns.items()}


def cut_episode_short(data: dict) -> tuple:
    """A replay buffer's path cut short: the rest of an episode after its third step is gone, so the next episode's
    first row follows a step that neither terminates nor times out. The data without it, and the cut row."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    start, end = next((s, e) for s, e in zip(ends[:-1] + 1, ends[1:]) if e - s >= 6)
    gone = np.arange(start + 3, end + 1)
    return {key: np.delete(value, gone, axis=0) for key, value in data.items()}, start + 2


def write_d4rl_file(path, data: dict, next_observations=True, timeouts=True, policy=True) -> str:
    """D4RL's layout: float32 arrays and bool flags (gzip), infos/ and, for a trained policy, metadata/ with its weights."""
    with h5py.File(path, "w") as f:
        for key in ("observations", "actions", "next_observations", "rewards"):
            if key != "next_observations" or next_observations:
                f.create_dataset(key, data=data[key].astype(np.float32), compression="gzip")
        for key in ("terminals", "timeouts") if timeouts else ("terminals",):
            f.create_dataset(key, data=data[key].astype(bool), compression="gzip")
        for key, name in (("logprobs", "action_log_probs"), ("qpos", "qpos"), ("qvel", "qvel")):
            f.create_dataset(f"infos/{name}", data=data[key].astype(np.float32), compression="gzip")
        if policy:
            f["metadata/algorithm"] = np.bytes_("SAC")
            f["metadata/iteration"] = np.array([120], dtype=np.int32)[0]
            f["metadata/policy/nonlinearity"] = np.bytes_("relu")
            f["metadata/policy/output_distribution"] = np.bytes_("tanh_gaussian")
            f["metadata/policy/fc0/weight"] = np.zeros((4, data["observations"].shape[1]), np.float32)
    return str(path)


def qlearning_dataset(path: str, horizon: int = 1000) -> dict:
    """D4RL's qlearning_dataset(env, terminate_on_end=False), row by row as D4RL's loop does: the next observation is the
    next row (it never reads `next_observations`); without `timeouts`, D4RL's count of kept steps finds them."""
    with h5py.File(path, "r") as f:
        data = {key: f[key][()] for key in f if isinstance(f[key], h5py.Dataset)}
    out = {key: [] for key in ("observations", "actions", "rewards", "next_observations", "terminals")}
    episode_step = 0
    for i in range(len(data["rewards"]) - 1):
        final_timestep = data["timeouts"][i] if "timeouts" in data else episode_step == horizon - 1
        if final_timestep:
            episode_step = 0
            continue
        if data["terminals"][i]:
            episode_step = 0
        next_obs = data["observations"][i + 1]
        for key, value in zip(out, (data["observations"][i], data["actions"][i], data["rewards"][i], next_obs)):
            out[key].append(value)
        out["terminals"].append(bool(data["terminals"][i]))
        episode_step += 1
    return {key: np.array(value) for key, value in out.items()}


def transitions(dataset) -> dict:
    """The (s, a, r, s', terminal) of every step of a Minari dataset, episode after episode."""
    episodes = list(dataset.iterate_episodes())
    parts = {
        "observations": [e.observations[:-1] for e in episodes],
        "actions": [e.actions for e in episodes],
        "rewards": [e.rewards for e in episodes],
        "next_observations": [e.observations[1:] for e in episodes],
        "terminals": [e.terminations for e in episodes],
    }
    return {key: np.concatenate(value) for key, value in parts.items()}


@pytest.fixture(scope="module")
def hopper_rollouts():
    return d4rl_rollouts("Hopper-v5", rows=700, max_path=30)


@pytest.fixture
def store(tmp_path, monkeypatch):
    path = tmp_path / "store"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(path))
    return path


def files_in(path) -> list:
    return [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]


def refused(capsys, *argv) -> str:
    """The one line on which the converter refuses, after checking that it exits with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        converter.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize(
    "file_name, dataset_id",
    [
        ("hopper_medium_replay-v2.hdf5", "d4rl/hopper/medium-replay-v2"),
        ("walker2d_medium_expert-v2.hdf5", "d4rl/walker2d/medium-expert-v2"),
        ("halfcheetah_full_replay-v1.hdf5", "d4rl/halfcheetah/full-replay-v1"),
        ("hopper_random-v2.hdf5", "d4rl/hopper/random-v2"),
        ("hopper_medium.hdf5", "d4rl/hopper/medium-v0"),  # D4RL's v0 files carry no version
        ("walker_mixed.hdf5", "d4rl/walker2d/medium-replay-v0"),  # and call medium-replay "mixed"
        ("data.hdf5", None),
    ],
)
def test_dataset_id_comes_from_d4rls_file_name(file_name, dataset_id):
    assert converter.dataset_id_from_file_name(f"/home/me/.d4rl/datasets/{file_name}") == dataset_id


@pytest.mark.parametrize("layout", ["v2", "v1 (no next_observations)"])
def test_transitions_are_qlearning_datasets_and_episodes_end_where_d4rls_do(layout, hopper_rollouts, tmp_path, store, capsys):
    data, cut_row = cut_episode_short(hopper_rollouts)
    has_next = layout == "v2"
    path = write_d4rl_file(tmp_path / f"hopper_medium_replay-{layout[:2]}.hdf5", data, next_observations=has_next)
    assert converter.main([path]) == f"d4rl/hopper/medium-replay-{layout[:2]}"
    dataset = minari.load_dataset(f"d4rl/hopper/medium-replay-{layout[:2]}")
    expected, converted = qlearning_dataset(path), transitions(dataset)
    for key in expected:
        np.testing.assert_array_equal(converted[key], expected[key], err_msg=key)
    assert converted["actions"].max() > 1.0  # as in D4RL's files, kept as they are

    episodes = list(dataset.iterate_episodes())
    for episode in episodes:  # only the last step of an episode ends it, by termination or truncation
        assert not (episode.terminations[:-1].any() or episode.truncations[:-1].any())
        assert episode.terminations[-1] != episode.truncations[-1]
    rows = len(data["rewards"])
    timeout_rows = int(data["timeouts"][:-1].sum())
    terminated, timed_out = int(data["terminals"][:-1].sum()), int(data["timeouts"][1:].sum())
    cuts = 1 if has_next else 0  # without next_observations a discontinuity cannot be seen
    assert sum(e.terminations[-1] for e in episodes) == terminated
    assert len(episodes) == terminated + timed_out + cuts + 1  # and the episode the file ends in
    if has_next:  # the cut episode ends, truncated, at the next row, the s' qlearning_dataset gives
        cut = next(e for e in episodes if len(e.rewards) == 3 and e.truncations[-1])
        np.testing.assert_array_equal(cut.observations[-1], data["observations"][cut_row + 1])
        assert not np.array_equal(data["observations"][cut_row + 1], data["next_observations"][cut_row])
    last_row_kept = rows - 2
    np.testing.assert_array_equal(episodes[-1].observations[-1], expected["next_observations"][-1])
    assert episodes[-1].truncations[-1] and not data["timeouts"][last_row_kept + 1]

    printed = capsys.readouterr().out
    assert f"{rows:,} rows, {rows - 1 - timeout_rows:,} transitions, {len(episodes):,} episodes" in printed
    assert (
        f"({terminated} terminated, {timed_out} truncated at timeouts, {cuts} cut at discontinuities, 1 truncated" in printed
    )
    assert f"dropped: {timeout_rows} timeout rows and the file's last row" in printed
    assert dataset.storage.metadata["ref_min_score"] == HOPPER_REFERENCES[0]
    assert dataset.storage.metadata["ref_max_score"] == HOPPER_REFERENCES[1]
    assert dataset.recover_environment(eval_env=True).spec.id == "Hopper-v5"


def test_a_timeout_step_is_dropped_and_its_episode_ends_truncated_at_its_observation(hopper_rollouts, tmp_path, store):
    path = write_d4rl_file(tmp_path / "hopper_random-v2.hdf5", hopper_rollouts, policy=False)
    converter.main([path])
    episodes = list(minari.load_dataset("d4rl/hopper/random-v2").iterate_episodes())
    file_episode_ends = np.flatnonzero(hopper_rollouts["terminals"] | hopper_rollouts["timeouts"])
    assert hopper_rollouts["timeouts"][file_episode_ends].sum() >= 3
    for episode, end in zip(episodes, file_episode_ends):  # no cut in this file: its episodes, in order
        if hopper_rollouts["timeouts"][end]:
            assert episode.truncations[-1] and len(episode.rewards) == 29  # of its 30 steps
            np.testing.assert_array_equal(episode.observations[-1], hopper_rollouts["observations"][end])
        else:
            assert episode.terminations[-1]
            np.testing.assert_array_equal(episode.observations[-1], hopper_rollouts["observations"][end + 1])


def test_a_file_without_timeouts_loses_the_steps_qlearning_dataset_counts_to_its_time_limit(tmp_path, store, capsys):
    data = d4rl_rollouts("HalfCheetah-v5", rows=2300, max_path=1000)  # HalfCheetah never terminates
    path = write_d4rl_file(tmp_path / "halfcheetah_medium.hdf5", data, next_observations=False, timeouts=False)
    converter.main([path])
    dataset = minari.load_dataset("d4rl/halfcheetah/medium-v0")
    expected, converted = qlearning_dataset(path), transitions(dataset)
    for key in expected:
        np.testing.assert_array_equal(converted[key], expected[key], err_msg=key)
    assert [len(e.rewards) for e in dataset.iterate_episodes()] == [999, 999, 299]
    assert "dropped: 2 timeout rows (no `timeouts` in the file: qlearning_dataset's step count)" in capsys.readouterr().out


def test_an_existing_dataset_is_replaced_only_with_overwrite(hopper_rollouts, tmp_path, store, capsys):
    path = write_d4rl_file(tmp_path / "hopper_expert-v2.hdf5", hopper_rollouts)
    converter.main([path])
    before = sorted(files_in(store))
    line = refused(capsys, path)
    assert "d4rl/hopper/expert-v2 is already in the Minari store" in line and "--overwrite" in line
    shorter = {key: value[:300] for key, value in hopper_rollouts.items()}
    converter.main([write_d4rl_file(tmp_path / "hopper_expert-v2.hdf5", shorter), "--overwrite"])
    assert sorted(files_in(store)) == before  # no staging folder left behind
    assert minari.load_dataset("d4rl/hopper/expert-v2").total_steps < 300
    assert list(minari.list_local_datasets()) == ["d4rl/hopper/expert-v2"]


@pytest.mark.parametrize(
    "file_name, dataset_id, why",
    [
        (
            "Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse_fixed.hdf5",
            None,
            "AntMaze: D4RL's ant model and maze",
        ),
        ("hopper_medium-v2.hdf5", "d4rl/antmaze/umaze-v2", "AntMaze: D4RL's ant model and maze"),
        ("maze2d-umaze-sparse-v1.hdf5", None, "Maze2D:"),
        ("mini_kitchen_microwave_kettle_light_slider-v0.hdf5", None, "Kitchen: use Minari's D4RL/kitchen/* datasets"),
        ("door-human-v1.hdf5", None, "Adroit: use Minari's D4RL/"),
        ("pen-v0_demos_clipped.hdf5", None, "Adroit: use Minari's D4RL/"),
        ("flow-ring-v0-random.hdf5", None, "Flow:"),
        ("carla_lane_follow_flat-v0.hdf5", None, "CARLA:"),
        ("ant_medium-v2.hdf5", None, "ant is not one of the D4RL locomotion robots converted here"),
        ("data.hdf5", None, "not a D4RL locomotion file name"),
        ("walker2d_medium-v2.hdf5", "d4rl/hopper/medium-v2", "the file name says walker2d"),
        ("hopper_medium-v2.hdf5", "hopper-medium", "not a dataset id of the form"),
    ],
)
def test_other_families_and_unknown_files_are_refused_in_one_line(
    file_name, dataset_id, why, hopper_rollouts, tmp_path, store, capsys
):
    path = write_d4rl_file(tmp_path / file_name, hopper_rollouts)
    line = refused(capsys, path, *(["--dataset-id", dataset_id] if dataset_id else []))
    assert line.startswith("error: ") and why in line
    assert files_in(store) == []


def break_file(path: str, key: str, how: str) -> None:
    with h5py.File(path, "r+") as f:
        value = f[key][()]
        del f[key]
        if how == "short":
            f[key] = value[:-1]
        elif how == "nan":
            value[[5, 9]] = np.nan
            f[key] = value
        elif how == "wide":
            f[key] = np.concatenate([value, np.zeros((len(value), 6), np.float32)], axis=1)
        elif how == "two columns":
            f[key] = np.stack([value, value], axis=1)
        elif how == "text":
            f[key] = np.array([b"no"] * len(value))


@pytest.mark.parametrize(
    "key, how, says",
    [
        ("observations", "missing", "no `observations` dataset (D4RL's files have observations, actions, rewards, terminals)"),
        ("actions", "missing", "no `actions` dataset (D4RL's files have observations, actions, rewards, terminals)"),
        ("rewards", "missing", "no `rewards` dataset (D4RL's files have observations, actions, rewards, terminals)"),
        ("terminals", "missing", "no `terminals` dataset (D4RL's files have observations, actions, rewards, terminals)"),
        ("actions", "short", "`actions` has 699 rows, `observations` 700: the lengths disagree"),
        ("timeouts", "short", "`timeouts` has 699 rows, `observations` 700: the lengths disagree"),
        ("next_observations", "short", "`next_observations` has 699 rows, `observations` 700: the lengths disagree"),
        ("observations", "nan", "`observations` holds non-finite values at row 5 (2 rows in all)"),
        ("rewards", "nan", "`rewards` holds non-finite values at row 5 (2 rows in all)"),
        ("next_observations", "nan", "`next_observations` holds non-finite values at row 5 (2 rows in all)"),
        ("observations", "wide", "`observations` has 17 values per row, hopper's have 11 (Hopper-v5)"),
        ("next_observations", "wide", "`next_observations` has 17 values per row, hopper's have 11 (Hopper-v5)"),
        ("actions", "wide", "`actions` has 9 values per row, hopper's have 3 (Hopper-v5)"),
        ("rewards", "two columns", "`rewards` has shape (700, 2); D4RL's has (rows,)"),
        ("terminals", "text", "`terminals` holds |S2 values, not numbers"),
    ],
)
def test_bad_files_are_refused_in_one_line_naming_file_and_key(key, how, says, hopper_rollouts, tmp_path, store, capsys):
    path = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5", hopper_rollouts)
    break_file(path, key, how)
    assert refused(capsys, path) == f"error: {path}: {says}"
    assert files_in(store) == []


@pytest.mark.parametrize(
    "rows, all_timeouts, says",
    [
        (1, False, "`observations` has fewer than two rows; a transition needs two"),
        (40, True, "`timeouts` flags every row but the last, so no transition is left"),
    ],
)
def test_files_that_leave_no_transition_are_refused(rows, all_timeouts, says, hopper_rollouts, tmp_path, store, capsys):
    data = {key: value[:rows] for key, value in hopper_rollouts.items()}
    data["timeouts"] = data["timeouts"] | all_timeouts
    path = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5", data)
    assert refused(capsys, path) == f"error: {path}: {says}"
    assert files_in(store) == []


def test_a_missing_or_non_hdf5_file_is_refused(tmp_path, store, capsys):
    path = tmp_path / "hopper_medium-v2.hdf5"
    assert refused(capsys, path) == f"error: {path}: no such file"
    path.write_text("observations,actions\n")
    assert refused(capsys, path) == f"error: {path}: not an HDF5 file"
    assert files_in(store) == []


def test_flags_and_rewards_stored_as_columns_are_read_as_d4rls_get_dataset_reads_them(hopper_rollouts, tmp_path, store):
    path = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5", hopper_rollouts)
    expected = qlearning_dataset(path)
    with h5py.File(path, "r+") as f:
        for key, dtype in (("rewards", np.float32), ("terminals", np.float64), ("timeouts", np.float64)):
            value = f[key][()]
            del f[key]
            f[key] = value[:, None].astype(dtype)
    converter.main([path])
    converted = transitions(minari.load_dataset("d4rl/hopper/medium-v2"))
    for key in expected:
        np.testing.assert_array_equal(converted[key], expected[key], err_msg=key)


TINY_RUN = dict(
    total_steps=20, batch_size=16, hidden_dims=(16, 16), eval_freq=0, final_eval_episodes=1, log_freq=10, cuda=False
)


def test_iql_trains_on_a_converted_file_with_locomotion_rewards_and_d4rls_references(hopper_rollouts, tmp_path, store):
    converter.main([write_d4rl_file(tmp_path / "hopper_medium_replay-v2.hdf5", hopper_rollouts)])
    run = iql.main(iql.Args(env_id="d4rl/hopper/medium-replay-v2", runs_dir=str(tmp_path / "runs"), **TINY_RUN))
    summary = json.load(open(tmp_path / "runs" / run["run_name"] / "summary.json"))
    assert summary["reward_normalization"] == "locomotion"
    assert (summary["scoring"]["ref_min"], summary["scoring"]["ref_max"]) == HOPPER_REFERENCES
    assert summary["scoring"]["source"].endswith("from dataset metadata")


def test_bc_scores_a_converted_file_with_d4rls_references(hopper_rollouts, tmp_path, store):
    converter.main([write_d4rl_file(tmp_path / "hopper_medium_replay-v2.hdf5", hopper_rollouts)])
    summary = bc.main(bc.Args(env_id="d4rl/hopper/medium-replay-v2", runs_dir=str(tmp_path / "runs"), **TINY_RUN))
    assert (summary["scoring"]["ref_min"], summary["scoring"]["ref_max"]) == HOPPER_REFERENCES
    assert summary["policies"]["bc"]["score_mean"] is not None
