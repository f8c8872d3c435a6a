"""The benchmark tooling turns runs into honest tables and SB3 replay buffers into honest episodes."""

import json

import numpy as np
import pytest

import bc
from benchmarks import datasets, tables


def test_tables_report_the_last_evaluation_per_step_budget(minari_store, tmp_path):
    # at 40 steps, seeds 1 and 2 alone and seeds 3 and 4 in one --num-seeds run; at 80 steps, seeds 1 and 2 alone
    for steps, seed, num_seeds in ((40, 1, 1), (40, 2, 1), (40, 3, 2), (80, 1, 1), (80, 2, 1)):
        bc.main(
            bc.Args(
                env_id="mujoco/hopper/tiny-v0", seed=seed, num_seeds=num_seeds, total_steps=steps, batch_size=16, hidden_dims=(8, 8),
                eval_freq=20, eval_episodes=2, final_eval_episodes=3, log_freq=20, runs_dir=str(tmp_path), cuda=False,
            )
        )
    runs = tables.load_runs([str(tmp_path)])
    assert tables.budgets(runs) == [40, 80]
    for steps, seeds in ((40, 4), (80, 2)):
        finals = []
        for run in (r for r in runs if r["args"]["total_steps"] == steps):
            history = [json.loads(line) for line in open(f"{run['dir']}/evaluations.jsonl")]
            results = run["summary"]["policies"]["bc"]
            for result in results.get("seeds", [results]):
                mine = [h for h in history if h["seed"] == result.get("seed", run["args"]["seed"])]
                assert [h["step"] for h in mine] == list(range(20, steps + 1, 20))
                assert mine[-1]["score_mean"] == pytest.approx(result["score_mean"])
                finals.append(mine[-1]["score_mean"])
        table = tables.score_table(runs, steps).splitlines()
        # one row per dataset, pooling only this budget's seeds, from their last evaluations; the code version under it
        assert table[2] == f"| mujoco/hopper/tiny-v0 | {np.mean(finals):.1f} ± {np.std(finals):.1f} ({seeds}) |"
        assert table[-1] == "Code: commit not recorded."
    curves = tables.learning_curves(runs, str(tmp_path / "curves"))
    assert [name for name, _ in curves] == ["mujoco/hopper/tiny-v0, 40 steps", "mujoco/hopper/tiny-v0, 80 steps"]
    assert tables.toy_table(runs) == "–"  # no toy runs: no empty table


def test_replay_buffer_is_cut_into_episodes_at_terminations_and_time_limits(tmp_path):
    # three episodes as SB3 stores them (one env): ended by a fall, by the time limit, and still running
    obs = np.arange(8, dtype=np.float32)[:, None]
    next_obs = obs + 0.5
    dones = np.array([0, 0, 1, 0, 1, 0, 0, 0], dtype=np.float32)
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0, 0], dtype=np.float32)
    path = tmp_path / "replay.npz"
    np.savez(path, observations=obs, next_observations=next_obs, actions=obs, rewards=obs[:, 0], dones=dones, timeouts=timeouts)

    episodes = datasets.replay_episodes(str(path), steps=7)
    assert [len(e.rewards) for e in episodes] == [3, 2]  # the unfinished third episode is left out
    fall, time_limit = episodes
    np.testing.assert_array_equal(fall.observations[:, 0], [0, 1, 2, 2.5])  # the last next-observation closes it
    assert fall.terminations.tolist() == [False, False, True] and not fall.truncations.any()
    assert time_limit.truncations.tolist() == [False, True] and not time_limit.terminations.any()
    np.testing.assert_array_equal(time_limit.rewards, [3, 4])


def test_bf16_runs_get_columns_of_their_own():
    fp32, bf16 = {"args": {"bf16": False}}, {"args": {"bf16": True}}
    assert [tables.label(run, policy) for run in (fp32, bf16) for policy in ("concurrent", "posthoc")] == ["IQL", "IQL post-hoc", "IQL (bf16)", "IQL post-hoc (bf16)"]
    assert tables.label({"args": {}}, "concurrent") == "IQL"  # runs from before --bf16 existed
