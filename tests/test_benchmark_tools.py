"""The benchmark tooling turns runs into honest tables and SB3 replay buffers into honest episodes."""

import json
import os
import shutil
import subprocess
import sys
from typing import Optional

import numpy as np
import pytest

import bc
import iql
from benchmarks import dataset_overview, datasets, tables


def importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# The figures need matplotlib, from benchmarks/requirements.txt (part of requirements-dev.txt); without it they skip.
needs_matplotlib = pytest.mark.skipif(not importable("matplotlib"), reason="pip install -r benchmarks/requirements.txt")


@needs_matplotlib
def test_tables_report_the_last_evaluation_per_step_budget(minari_store, tmp_path):
    # at 40 steps, seeds 1 and 2 alone and seeds 3 and 4 in one --num-seeds run; at 80 steps, seeds 1 and 2 alone
    for steps, seed, num_seeds in ((40, 1, 1), (40, 2, 1), (40, 3, 2), (80, 1, 1), (80, 2, 1)):
        bc.main(
            bc.Args(
                env_id="mujoco/hopper/tiny-v0",
                seed=seed,
                num_seeds=num_seeds,
                total_steps=steps,
                batch_size=16,
                hidden_dims=(8, 8),
                eval_freq=20,
                eval_episodes=2,
                final_eval_episodes=3,
                log_freq=20,
                runs_dir=str(tmp_path),
                cuda=False,
            )
        )
    runs = tables.load_runs([str(tmp_path)])
    assert tables.budgets(runs) == [40, 80]
    for steps, seeds in ((40, 4), (80, 2)):
        finals, lates = [], []
        for run in (r for r in runs if r["args"]["total_steps"] == steps):
            history = [json.loads(line) for line in open(f"{run['dir']}/evaluations.jsonl")]
            results = run["summary"]["policies"]["bc"]
            for result in results.get("seeds", [results]):
                mine = [h for h in history if h["seed"] == result.get("seed", run["args"]["seed"])]
                assert [h["step"] for h in mine] == list(range(20, steps + 1, 20))
                assert mine[-1]["score_mean"] == pytest.approx(result["score_mean"])
                finals.append(mine[-1]["score_mean"])
                lates.append(np.mean([h["score_mean"] for h in mine if h["step"] >= steps / 2]))
        table = tables.score_table(runs, steps).splitlines()
        # one row per dataset, pooling only this budget's seeds, from their last evaluations; the code version under it
        assert table[2] == f"| mujoco/hopper/tiny-v0 | {np.mean(finals):.1f} ± {np.std(finals):.1f} ({seeds}) |"
        assert table[-1] == "Code: commit not recorded."
        # late: each seed's own evaluations from half the budget on (steps 20 and 40 of 40; 40, 60 and 80 of 80), not the
        # other seeds'
        assert len(set(lates)) == seeds and lates != finals
        late_table = tables.score_table(runs, steps, late=True).splitlines()
        assert late_table[2] == f"| mujoco/hopper/tiny-v0 | {np.mean(lates):.1f} ± {np.std(lates):.1f} ({seeds}) |"
    curves = tables.learning_curves(runs, str(tmp_path / "curves"))
    assert [name for name, _ in curves] == ["mujoco/hopper/tiny-v0, 40 steps", "mujoco/hopper/tiny-v0, 80 steps"]
    assert tables.toy_table(runs) is None  # no toy runs: no empty table


def test_replay_buffer_is_cut_into_episodes_at_terminations_and_time_limits(tmp_path):
    # three episodes as SB3 stores them (one env): ended by a fall, by the time limit, and still running
    obs = np.arange(8, dtype=np.float32)[:, None]
    next_obs = obs + 0.5
    dones = np.array([0, 0, 1, 0, 1, 0, 0, 0], dtype=np.float32)
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0, 0], dtype=np.float32)
    path = tmp_path / "replay.npz"
    np.savez(
        path, observations=obs, next_observations=next_obs, actions=obs, rewards=obs[:, 0], dones=dones, timeouts=timeouts
    )

    episodes = datasets.replay_episodes(str(path), steps=7)
    assert [len(e.rewards) for e in episodes] == [3, 2]  # the unfinished third episode is left out
    fall, time_limit = episodes
    np.testing.assert_array_equal(fall.observations[:, 0], [0, 1, 2, 2.5])  # the last next-observation closes it
    assert fall.terminations.tolist() == [False, False, True] and not fall.truncations.any()
    assert time_limit.truncations.tolist() == [False, True] and not time_limit.terminations.any()
    np.testing.assert_array_equal(time_limit.rewards, [3, 4])


def test_bf16_runs_get_columns_of_their_own():
    fp32, bf16 = {"args": {"bf16": False}}, {"args": {"bf16": True}}
    assert [tables.label(run, policy) for run in (fp32, bf16) for policy in ("concurrent", "posthoc")] == [
        "IQL",
        "IQL post-hoc",
        "IQL (bf16)",
        "IQL post-hoc (bf16)",
    ]
    assert tables.label({"args": {}}, "concurrent") == "IQL"  # runs from before --bf16 existed


def test_a_log_that_two_runs_printed_into_at_once_is_refused(tmp_path):
    # run a had printed step 5,000 when run b began in the same log; a's next line then reads as b's, and b's own next one
    # goes back
    lines = [
        "python iql.py --resume runs/a",
        "train step     5000/300000 |  80 upd/s | ETA  60.0 min | v_mean 30",
        "python iql.py --resume runs/b",
        "train step      300/300000 |  80 upd/s | ETA  62.0 min | v_mean 1",
        "train step    10000/300000 |  80 upd/s | ETA  59.0 min | v_mean 40",
        "train step     5000/300000 |  80 upd/s | ETA  61.0 min | v_mean 28",
    ]
    (tmp_path / "grid.log").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        SystemExit, match="grid.log: train step 5000 after step 10000 of the same run: two runs printed into this log"
    ):
        tables.training_metrics([str(tmp_path / "grid.log")])


@needs_matplotlib
def test_value_curves_come_from_each_iql_runs_own_log_lines(minari_store, tmp_path, capsys):
    import tyro

    import iql
    from benchmarks import run_grid

    # a grid's log as run_grid.py prints it: each command, then what the run printed; two IQL seeds and a BC run between them
    flags = [
        "--batch-size",
        "16",
        "--hidden-dims",
        "8",
        "8",
        "--eval-freq",
        "0",
        "--final-eval-episodes",
        "2",
        "--log-freq",
        "50",
        "--no-cuda",
    ]
    log = []
    for seed in (1, 2):
        for command in run_grid.commands(
            "mujoco/hopper/tiny-v0",
            seed,
            100,
            str(tmp_path / "runs"),
            flags,
            [],
            ["iql", "bc"] if seed == 1 else ["iql"],
            "concurrent",
        ):
            module = iql if command[0] == "iql.py" else bc
            module.main(tyro.cli(module.Args, args=command[1:]))
            log += [" ".join(["python", *command]), capsys.readouterr().out]
    runs = tables.load_runs([str(tmp_path / "runs")])
    iql_runs = {run["args"]["seed"]: run for run in runs if "posthoc_steps" in run["args"]}
    first, second = (os.path.abspath(iql_runs[seed]["dir"]) for seed in (1, 2))
    second_output = log[5]
    # a resumed segment's line for a step wins over the line of the same step before the resume
    log += [
        f"python iql.py --resume {iql_runs[1]['dir']}",
        "train step       50/100 |     10 upd/s | ETA   0.1 min | v_mean 7.5 advantage_mean -1 awr_weight_mean 2",
    ]
    # seed 2 as if its first start had stopped before its first checkpoint: an older folder of the same arguments, its
    # lines, then the same command again; each start's lines go to its own folder
    prefix, started = iql_runs[2]["dir"].rsplit("__", 1)
    stale = f"{prefix}__{int(started) - 1}"
    os.makedirs(stale)
    shutil.copyfile(os.path.join(iql_runs[2]["dir"], "args.json"), os.path.join(stale, "args.json"))
    log[4:4] = [
        log[4],
        "train step       50/100 |     10 upd/s | ETA   0.1 min | v_mean 9.5 advantage_mean -2 awr_weight_mean 3",
    ]
    (tmp_path / "grid.log").write_text("\n".join(log) + "\n")
    metrics = tables.training_metrics([str(tmp_path / "grid.log")])
    assert sorted(metrics) == sorted([first, second, os.path.abspath(stale)])  # the BC run's lines belong to no IQL run
    assert sorted(metrics[first]) == sorted(metrics[second]) == [50, 100]
    assert metrics[first][50] == {"v_mean": 7.5, "advantage_mean": -1.0, "awr_weight_mean": 2.0}
    assert metrics[os.path.abspath(stale)] == {50: {"v_mean": 9.5, "advantage_mean": -2.0, "awr_weight_mean": 3.0}}
    assert metrics[first][100] != metrics[second][100]
    (line,) = [
        line for line in second_output.splitlines() if line.startswith("train step      100/")
    ]  # what seed 2's run printed
    assert line.endswith(" ".join(f"{k} {v:.4g}" for k, v in metrics[second][100].items()))
    # the V panel's reference line: the dataset's mean discounted return-to-go in the run's training reward
    data = iql.flatten_dataset(iql.load_minari_dataset("mujoco/hopper/tiny-v0"))
    scale, shift = iql.reward_transform("locomotion", data.episode_returns)
    to_go = [
        sum(0.99**k * (r * scale + shift) for k, r in enumerate(data.rewards[start + t : start + n]))
        for start, n in zip(data.episode_starts, data.episode_lengths)
        for t in range(n)
    ]
    assert tables.discounted_return_to_go(iql_runs[1]) == pytest.approx(np.mean(to_go), rel=1e-5)
    curves = tables.training_curves(runs, metrics, str(tmp_path / "curves"))
    assert [name for name, _ in curves] == ["mujoco/hopper/tiny-v0, 100 steps: V, advantages, AWR weights"] and os.path.exists(
        curves[0][1]
    )


@needs_matplotlib
def test_write_fills_only_the_named_block_with_the_runs_datasets(minari_store, tmp_path, monkeypatch):
    bc.main(
        bc.Args(
            env_id="mujoco/hopper/tiny-v0",
            total_steps=20,
            batch_size=16,
            hidden_dims=(8, 8),
            eval_freq=0,
            final_eval_episodes=2,
            runs_dir=str(tmp_path / "runs"),
            cuda=False,
        )
    )
    record = {
        "episodes": 10,
        "steps": 500,
        "return_min": 10.0,
        "return_mean": 60.0,
        "return_max": 110.0,
        "return_quartiles": [30.0, 55.0, 90.0],
        "ref_min_score": 10.0,
        "ref_max_score": 210.0,
    }
    (tmp_path / "datasets.jsonl").write_text(
        "".join(json.dumps({"dataset_id": d, **record}) + "\n" for d in ("mujoco/hopper/tiny-v0", "local/unused-v0"))
    )
    page = tmp_path / "page.md"
    page.write_text(
        "intro\n<!-- tables:start -->\nold results\n<!-- tables:end -->\n"
        "middle\n<!-- later:start -->\n<!-- later:end -->\nend\n"
    )
    argv = [
        "tables.py",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--write",
        str(page),
        "--block",
        "later",
        "--curves",
        str(tmp_path / "curves"),
        "--datasets-record",
        str(tmp_path / "datasets.jsonl"),
        "--returns",
    ]
    monkeypatch.setattr("sys.argv", argv)
    tables.main()
    text = page.read_text()
    assert text.startswith(
        "intro\n<!-- tables:start -->\nold results\n<!-- tables:end -->\nmiddle\n<!-- later:start -->\n### Datasets as built"
    )
    assert text.endswith("<!-- later:end -->\nend\n")
    # only the dataset the runs used; its normalised mean return is 100 * (60 - 10) / (210 - 10) = 25
    assert (
        "| mujoco/hopper/tiny-v0 | 10 | 500 | 60 (30, 55, 90; 10, 110) | 25.0 | 10.0, 210.0 | – | – |" in text
        and "unused" not in text
    )
    assert "Toy two-step MDP" not in text and "### Scores at 20 gradient steps" in text
    # --returns: the BC run's final score drawn among the dataset's episode returns
    assert (
        "- [mujoco/hopper/tiny-v0, 20 steps: final scores among the dataset's episode returns]"
        "(curves/mujoco__hopper__tiny-v0__20__returns.png)" in text
    )
    assert (tmp_path / "curves" / "mujoco__hopper__tiny-v0__20__returns.png").exists()


def test_awr_weight_stats_by_hand():
    # four episodes: returns 300 (60 steps, ends in a fall), 1000 (10 steps), 20 (20 steps), 500 (10 steps); the others
    # end at a time limit
    lengths = np.array([60, 10, 20, 10])
    rewards = np.repeat([5.0, 100.0, 1.0, 50.0], lengths).astype(np.float32)
    ends = np.cumsum(lengths) - 1
    terminations, truncations = np.zeros(100, bool), np.zeros(100, bool)
    terminations[ends[0]], truncations[ends[1:]] = True, True
    data = bc.OfflineData(
        np.zeros((104, 3), np.float32), np.zeros((100, 1), np.float32), rewards, terminations, truncations, lengths
    )
    adv = np.repeat([0.0, np.log(3.0), -0.1, 0.0], lengths)
    adv[-1] = 5.0  # clipped at exp_adv_max = e^2
    seed_1, seed_2 = tables.awr_weight_stats(data, np.stack([adv, -adv]), temperature=1.0, exp_adv_max=np.e**2)
    w = np.concatenate([np.ones(60), np.full(10, 3.0), np.full(20, np.exp(-0.1)), np.ones(9), [np.e**2]])
    # 10% BC keeps the 1000-return episode alone (10 of 100 steps); a fall's last 50 steps are steps 10 to 59 of the first
    # episode
    assert seed_1["top10_steps"] == 0.1 and seed_1["top10_weight"] == pytest.approx(30 / w.sum())
    assert seed_1["fall_steps"] == 0.5 and seed_1["fall_weight"] == pytest.approx(50 / w.sum())
    assert seed_1["ess"] == pytest.approx(w.sum() ** 2 / (100 * np.square(w).sum())) and seed_1["clipped"] == 0.01
    # mean advantages rank the episodes as their returns do (1000 > 500 > 300 > 20), and the negated ones the other way round
    assert seed_1["return_rank_corr"] == pytest.approx(1.0) and seed_2["return_rank_corr"] == pytest.approx(-1.0)
    assert seed_2["top10_weight"] == pytest.approx(10 / 3 / np.exp(np.minimum(-adv, 2.0)).sum()) and seed_2["clipped"] == 0.0


def test_awr_weights_come_from_the_saved_networks_as_the_update_computes_them(minari_store, tmp_path):
    import torch

    import iql

    iql.main(
        iql.Args(
            env_id="mujoco/hopper/tiny-v0",
            num_seeds=2,
            total_steps=30,
            batch_size=16,
            hidden_dims=(8, 8),
            eval_freq=0,
            final_eval_episodes=2,
            checkpoint_freq=10,
            runs_dir=str(tmp_path / "runs"),
            cuda=False,
        )
    )
    (run,) = tables.load_runs([str(tmp_path / "runs")])
    data, args, advantages = tables.final_advantages(run)
    checkpoint = iql.load_checkpoint(os.path.join(run["dir"], "checkpoint.pt"))
    value, critic = (
        iql.Ensemble(data.observations.shape[1], (8, 8), 1, 2),
        iql.Ensemble(data.observations.shape[1] + 3, (8, 8), 1, 4),
    )
    value.load_state_dict(checkpoint["networks"]["value"])
    critic.load_state_dict(checkpoint["networks"]["target_critic"])
    obs, actions = (torch.as_tensor(x).expand(2, -1, -1) for x in (data.observations[data.obs_rows], data.actions))
    with torch.no_grad():
        expected = iql.twin_q(critic, obs, actions).min(dim=1).values - value(obs).squeeze(-1)
    assert advantages.shape == (2, len(data.rewards)) and np.allclose(advantages, expected.numpy(), atol=1e-5)
    assert not np.allclose(advantages[0], advantages[1])  # each seed's networks
    (row,) = tables.awr_weight_table([run]).splitlines()[2:]
    # the two seeds' advantages agree as much as Pearson's r over the steps says: one pair, so no spread
    assert row.startswith("| mujoco/hopper/tiny-v0 | 30 | ") and row.endswith(
        f" | {np.corrcoef(*advantages)[0, 1]:.2f} ± 0.00 | 2 |"
    )
    # a value network saved as an nn.Sequential of Linear layers, as checkpoints from before Ensemble hold it, gives the
    # same outputs
    sequential = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    )
    x = torch.randn(7, 5)
    with torch.no_grad():
        assert torch.allclose(
            tables.mlp_output(tables.saved_mlp(sequential.state_dict()), x), sequential(x).squeeze(-1), atol=1e-6
        )


@needs_matplotlib
def test_tables_from_the_archive_alone_equal_those_from_the_runs(minari_store, tmp_path, monkeypatch, capsys):
    import minari
    import tyro

    import iql
    from benchmarks import run_grid

    # a grid of BC and two IQL seeds, with its log, as run_grid.py runs it
    flags = [
        "--batch-size",
        "16",
        "--hidden-dims",
        "8",
        "8",
        "--eval-freq",
        "50",
        "--eval-episodes",
        "2",
        "--final-eval-episodes",
        "2",
        "--log-freq",
        "50",
        "--no-cuda",
    ]
    runs_dir, log = tmp_path / "grid", []
    for seed in (1, 2):
        for command in run_grid.commands(
            "mujoco/hopper/tiny-v0", seed, 100, str(runs_dir), flags, [], ["iql", "bc"] if seed == 1 else ["iql"], "concurrent"
        ):
            module = iql if command[0] == "iql.py" else bc
            module.main(tyro.cli(module.Args, args=command[1:]))
            log += [" ".join(["python", *command]), capsys.readouterr().out]
    (runs_dir / "commit.txt").write_text("0123456789abcdef\n")
    (tmp_path / "grid.log").write_text("\n".join(log) + "\n")
    record = {
        "dataset_id": "mujoco/hopper/tiny-v0",
        "episodes": 12,
        "steps": 300,
        "return_min": 1.0,
        "return_mean": 20.0,
        "return_max": 50.0,
        "return_quartiles": [10.0, 20.0, 30.0],
        "ref_min_score": 0.0,
        "ref_max_score": 100.0,
        "sha256": datasets.fingerprint(minari.load_dataset("mujoco/hopper/tiny-v0")),
    }
    (tmp_path / "record.jsonl").write_text(json.dumps(record) + "\n")

    def block(*flags):
        page = tmp_path / "page.md"
        page.write_text("<!-- b:start -->\n<!-- b:end -->\n")
        common = [
            "--train-logs",
            str(tmp_path / "grid.log"),
            "--awr-weights",
            "--returns",
            "--datasets-record",
            str(tmp_path / "record.jsonl"),
        ]
        monkeypatch.setattr(
            "sys.argv",
            [
                "tables.py",
                "--runs-dir",
                str(runs_dir),
                *common,
                "--write",
                str(page),
                "--block",
                "b",
                "--curves",
                str(tmp_path / "curves"),
                *flags,
            ],
        )
        tables.main()
        return page.read_text()

    from_runs = block()
    assert (
        "Code: commit 0123456789ab." in from_runs and "| mujoco/hopper/tiny-v0 | 100 | " in from_runs
    )  # the AWR table has its row
    assert "V, advantages, AWR weights" in from_runs and "final scores among the dataset's episode returns" in from_runs
    assert f"| 0.0, 100.0 | – | {record['sha256'][:12]} |" in from_runs  # the datasets table names the data's fingerprint
    assert block("--archive", str(tmp_path / "archive")) == from_runs
    archived = sorted(p.name for p in (tmp_path / "archive" / "grid").iterdir())
    assert len(archived) == 3 and sorted(os.listdir(tmp_path / "archive" / "grid" / archived[0])) == sorted(
        ["args.json", "summary.json", "evaluations.jsonl", "commit.txt"]
        + (["training.json", "awr_weights.json"] if "iql" in archived[0] else [])
    )
    # runs on a dataset rebuilt with other contents are never archived beside those trained on the old one
    (tmp_path / "record.jsonl").write_text(json.dumps({**record, "sha256": "0" * 64}) + "\n")
    with pytest.raises(SystemExit, match="rebuilt with other contents"):
        block("--archive", str(tmp_path / "archive"))
    # the runs, their networks, the log, the record and the dataset itself gone: the archive alone gives the same tables
    shutil.rmtree(runs_dir)
    (tmp_path / "record.jsonl").unlink()
    (tmp_path / "grid.log").write_text("")
    monkeypatch.setattr(tables, "dataset_arrays", lambda dataset: pytest.fail("read the dataset"))
    assert block("--archive", str(tmp_path / "archive")) == from_runs
    # another grid's folder in the archive: --archived keeps each block to its own grids, and a misspelt name stops
    shutil.copytree(tmp_path / "archive" / "grid", tmp_path / "archive" / "other")
    assert block("--archive", str(tmp_path / "archive")) != from_runs
    assert block("--archive", str(tmp_path / "archive"), "--archived", "grid") == from_runs
    with pytest.raises(SystemExit, match="has no runs folder gird "):
        block("--archive", str(tmp_path / "archive"), "--archived", "gird")
    with pytest.raises(SystemExit):  # without --archive it would name nothing and be ignored
        block("--archived", "grid")


def test_a_dataset_fingerprint_follows_its_contents(minari_store, tmp_path, monkeypatch):
    import minari

    from tests.datasets import make_hopper_dataset

    hopper, maze = (
        minari.load_dataset(d) for d in ("mujoco/hopper/tiny-v0", "D4RL/pointmaze/open-tiny-v0")
    )  # array and dict observations
    assert datasets.fingerprint(hopper) == datasets.fingerprint(minari.load_dataset("mujoco/hopper/tiny-v0"))
    assert len({datasets.fingerprint(hopper), datasets.fingerprint(maze)}) == 2
    monkeypatch.setenv(
        "MINARI_DATASETS_PATH", str(tmp_path)
    )  # a store of its own: the shared one's ids are what other tests list
    assert datasets.fingerprint(make_hopper_dataset(seed=0)) == datasets.fingerprint(
        hopper
    )  # the same recipe and seed: the same data
    assert datasets.fingerprint(make_hopper_dataset("mujoco/hopper/tiny-seed1-v0", seed=1)) != datasets.fingerprint(hopper)


def test_a_behaviour_policy_run_repeats_on_one_processor_and_names_it(tmp_path):
    # the Hopper datasets are rebuilt from this run; only the same seed on the same kind of processor gives the same data
    pytest.importorskip("stable_baselines3", reason="benchmarks/requirements.txt")
    from benchmarks import behaviour_policies, processor

    outs = [tmp_path / name for name in ("first", "second")]
    for out in outs:
        subprocess.run(
            [
                sys.executable,
                behaviour_policies.__file__,
                "--env",
                "Hopper-v5",
                "--total-steps",
                "200",
                "--eval-every",
                "100",
                "--eval-episodes",
                "1",
                "--out",
                str(out),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    progress = [[json.loads(line) for line in open(out / "progress.jsonl")] for out in outs]
    assert [p["step"] for p in progress[0]] == [100, 200]
    assert {p["processor"] for p in progress[0] + progress[1]} == {processor()} and processor()
    assert [p["return_mean"] for p in progress[0]] == [p["return_mean"] for p in progress[1]]
    first, second = (np.load(out / "replay.npz") for out in outs)
    assert len(first["rewards"]) == 199  # saved before the checkpoint step's own transition
    for key in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        np.testing.assert_array_equal(first[key], second[key])


def iql_metrics(seed: int) -> list:
    """The metrics.jsonl records of a 15,000-step IQL run (--log-freq 5000, post-hoc actor of 1,000 steps) that stopped after
    step 10,000 and resumed from its checkpoint at 5,000, its file not cut back: step 10,000 is written twice. Every value
    is a short binary fraction, which the printed lines (4 significant digits) hold exactly."""
    records = []
    for step, again in ((300, 0), (5000, 0), (10000, 0), (10000, 1), (15000, 1)):
        v = step // 1000 + seed + again / 2 + 0.25
        records.append(
            {
                "phase": "train",
                "step": step,
                "losses/value_loss": 0.125 * seed,
                "losses/critic_loss": 2.5,
                "charts/v_mean": v,
                "charts/q_mean": v + 1,
                "losses/actor_loss": 3.0 - again,
                "charts/advantage_mean": -1.0 + 0.25 * again,
                "charts/awr_weight_mean": 2.0 + 0.5 * seed,
                "charts/updates_per_second": 85.0,
            }
        )
    for step in (300, 1000):
        records.append(
            {
                "phase": "posthoc",
                "step": step,
                "losses/posthoc_actor_loss": 1.5,
                "charts/posthoc_advantage_mean": 0.5,
                "charts/posthoc_awr_weight_mean": 1.25,
                "charts/updates_per_second": 300.0,
            }
        )
    return records


def printed_lines(run_dir: str, records: list) -> list:
    """The log run_grid.py keeps of the run that wrote records: its command, then what iql.py printed at each record, in
    iql.py's format; the resume's command before the step written again."""
    lines, last = [f"python iql.py --resume {run_dir}"], 0
    for r in records:
        if r["phase"] == "train" and r["step"] <= last:
            lines.append(f"python iql.py --resume {run_dir}")
        last = r["step"] if r["phase"] == "train" else last
        total = 15000 if r["phase"] == "train" else 1000
        values = " ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in r.items() if "/" in k and k != "charts/updates_per_second")
        speed = r["charts/updates_per_second"]
        lines.append(f"{r['phase']} step {r['step']:>8}/{total} | {speed:7.0f} upd/s | ETA   1.0 min | {values}")
    return lines


def fake_run(runs_dir, name: str, args: dict, summary: Optional[dict], metrics: list, policy: str = "concurrent") -> str:
    """A run folder with the files tables.py reads (summary.json only if it finished), made without training."""
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    args = {"env_id": "local/fake/medium-v0", "seed": 1, "num_seeds": 1, "total_steps": 15000, "bf16": False, **args}
    (run_dir / "args.json").write_text(json.dumps(args))
    score = 40.0 + args["seed"]
    (run_dir / "evaluations.jsonl").write_text(
        json.dumps({"policy": policy, "seed": args["seed"], "step": 15000, "score_mean": score}) + "\n"
    )
    if summary is not None:
        summary = {"env_id": args["env_id"], "policies": {policy: {"score_mean": score}}, **summary}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return str(run_dir)


def test_a_fine_tuned_run_is_left_out_of_the_offline_tables_in_one_line(tmp_path, capsys):
    offline = fake_run(tmp_path, "iql__1", {"online_steps": 0}, {}, [])
    tuned = fake_run(tmp_path, "iql__2", {"seed": 2, "online_steps": 1000}, {}, [], policy="offline")
    assert [run["dir"] for run in tables.load_runs([str(tmp_path)])] == [offline]
    assert capsys.readouterr().err.splitlines() == [
        f"tables.py: {tuned} was fine-tuned online (--online-steps); left out of the tables"
    ]


def fake_iql_run(runs_dir, seed: int) -> str:
    return fake_run(runs_dir, f"iql__{seed}", {"seed": seed, "posthoc_steps": 1000}, {}, iql_metrics(seed))


@needs_matplotlib
def test_training_curves_from_metrics_jsonl_equal_those_from_the_printed_log(tmp_path, monkeypatch):
    runs_dir, log = tmp_path / "runs", []
    for seed in (1, 2):
        log += printed_lines(fake_iql_run(runs_dir, seed), iql_metrics(seed))
    first, second = (os.path.abspath(runs_dir / f"iql__{seed}") for seed in (1, 2))
    # a BC run writes the file too, and a run still training may be writing its last line: neither has IQL's curves
    bc_metrics = [{"phase": "train", "step": 300, "losses/bc_loss": 1.2, "charts/updates_per_second": 340.0}]
    summary = {"data_selection": {"top_fraction": 1.0, "top_by": "steps"}}
    fake_run(runs_dir, "bc__1", {"top_fraction": 1.0}, summary, bc_metrics, policy="bc")
    unfinished = fake_run(runs_dir, "iql__3", {"seed": 3, "posthoc_steps": 1000}, None, iql_metrics(3))
    with open(os.path.join(unfinished, "metrics.jsonl"), "a") as f:
        f.write('{"phase": "train", "st')
    (tmp_path / "grid.log").write_text("\n".join(log) + "\n")

    from_log = tables.training_metrics([str(tmp_path / "grid.log")])
    from_files = tables.training_metrics([], [str(runs_dir)])
    assert from_files == from_log and sorted(from_files) == [first, second]
    # the V/Q phase only, the step written again taken from its later record, named as the printed lines name them
    assert sorted(from_files[first]) == [300, 5000, 10000, 15000]
    assert from_files[first][10000] == {
        "value_loss": 0.125,
        "critic_loss": 2.5,
        "v_mean": 11.75,
        "q_mean": 12.75,
        "actor_loss": 2.0,
        "advantage_mean": -0.75,
        "awr_weight_mean": 2.5,
    }
    assert tables.training_metrics([str(tmp_path / "grid.log")], [str(runs_dir)]) == from_files
    # a run resumed by a version that wrote metrics.jsonl holds only the later steps there: the log keeps the earlier ones
    with open(os.path.join(second, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps({**r, "charts/v_mean": 99.0}) + "\n" for r in iql_metrics(2)[3:]))
    both = tables.training_metrics([str(tmp_path / "grid.log")], [str(runs_dir)])
    assert [both[second][s]["v_mean"] for s in (300, 5000, 10000, 15000)] == [2.25, 7.25, 99.0, 99.0]

    monkeypatch.setattr(tables, "discounted_return_to_go", lambda run: 20.0)  # the panel's reference line reads the dataset
    runs = tables.load_runs([str(runs_dir)])
    ((name, path_log),) = tables.training_curves(runs, from_log, str(tmp_path / "from_log"))
    ((_, path_files),) = tables.training_curves(runs, from_files, str(tmp_path / "from_files"))
    assert name == "local/fake/medium-v0, 15,000 steps: V, advantages, AWR weights"
    assert open(path_log, "rb").read() == open(path_files, "rb").read()


@needs_matplotlib
def test_runs_with_metrics_jsonl_need_no_log_and_archive_their_curves(tmp_path, monkeypatch):
    import types

    runs_dir = tmp_path / "runs"
    run_dirs = [fake_iql_run(runs_dir, seed) for seed in (1, 2)]
    # what the dataset would give: the V panel's reference line, and the episode returns the archive keeps
    monkeypatch.setattr(tables, "discounted_return_to_go", lambda run: 20.0)
    monkeypatch.setattr(tables, "dataset_arrays", lambda dataset: types.SimpleNamespace(episode_returns=np.array([1.0, 2.0])))

    def block(*flags):
        page = tmp_path / "page.md"
        page.write_text("<!-- b:start -->\n<!-- b:end -->\n")
        argv = ["tables.py", "--runs-dir", str(runs_dir), "--write", str(page), "--block", "b"]
        argv += ["--curves", str(tmp_path / "curves"), "--datasets-record", str(tmp_path / "none.jsonl"), *flags]
        monkeypatch.setattr("sys.argv", argv)
        tables.main()
        return page.read_text()

    from_runs = block()  # no --train-logs
    figure = "curves/local__fake__medium-v0__15000__value.png"
    assert f"- [local/fake/medium-v0, 15,000 steps: V, advantages, AWR weights]({figure})" in from_runs
    assert (tmp_path / figure).exists()
    assert block("--archive", str(tmp_path / "archive")) == from_runs
    for run_dir in run_dirs:
        training = json.load(open(tmp_path / "archive" / "runs" / os.path.basename(run_dir) / "training.json"))
        steps = tables.training_metrics([], [str(runs_dir)])[os.path.abspath(run_dir)]
        assert training == {"steps": {str(s): m for s, m in steps.items()}, "return_to_go": 20.0}
    shutil.rmtree(runs_dir)
    runs_dir.mkdir()
    assert block("--archive", str(tmp_path / "archive")) == from_runs


@needs_matplotlib
def test_dataset_overview_shows_small_counts_with_labelled_axes_and_integer_bins(tmp_path, monkeypatch):
    """A maze-like dataset: three 300-step episodes, a single reward-1 step among 900."""
    import matplotlib.pyplot as plt

    rewards = np.zeros(900, np.float32)
    rewards[450] = 1.0
    data = iql.OfflineData(
        observations=np.zeros((903, 2), np.float32),
        actions=np.zeros((900, 1), np.float32),
        rewards=rewards,
        terminations=np.zeros(900, bool),
        truncations=np.isin(np.arange(900), [299, 599, 899]),
        episode_lengths=np.array([300, 300, 300]),
    )
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    dataset_overview.plot_dataset_overview(data, "D4RL/pointmaze/umaze-v1", str(tmp_path / "overview.png"))
    assert (tmp_path / "overview.png").stat().st_size > 0
    rewards_ax, lengths_ax, returns_ax, ends_ax = figures[0].axes
    for ax, counted in ((rewards_ax, "steps"), (lengths_ax, "episodes"), (returns_ax, "episodes"), (ends_ax, "episodes")):
        assert ax.get_xlabel() or ax is ends_ax
        assert ax.get_ylabel().startswith(counted)
    # one bar per integer value, centred on it, and a count of 1 stands above the bottom of the log axis
    bars = {round(p.get_x() + p.get_width() / 2, 6): p.get_height() for p in rewards_ax.patches if p.get_height() > 0}
    assert bars == {0.0: 899, 1.0: 1} and rewards_ax.get_ylim()[0] < 1
    assert {round(p.get_x() + p.get_width() / 2, 6) for p in lengths_ax.patches if p.get_height() > 0} == {300.0}
    assert all(tick == int(tick) for tick in lengths_ax.get_xticks())  # no ticks like 299.6
    assert [p.get_height() for p in ends_ax.patches] == [0, 3]


@needs_matplotlib
def test_dataset_overview_command_draws_a_stored_dataset(minari_store, tmp_path):
    out = tmp_path / "hopper.png"
    command = [sys.executable, dataset_overview.__file__, "mujoco/hopper/tiny-v0", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}" and out.stat().st_size > 0
    # by default under runs/, which git ignores: run from the repository, it leaves nothing to commit
    result = subprocess.run(command[:-2], capture_output=True, text=True, cwd=tmp_path)
    default = os.path.join("runs", "dataset_overview", "hopper_tiny-v0.png")
    assert result.stdout.strip() == f"wrote {default}" and (tmp_path / default).stat().st_size > 0
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run(["git", "check-ignore", "-q", default], cwd=repo).returncode == 0


def test_dataset_overview_without_matplotlib_names_the_install_in_one_line(minari_store, tmp_path):
    blocked = tmp_path / "blocked" / "matplotlib"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n")
    command = [sys.executable, dataset_overview.__file__, "mujoco/hopper/tiny-v0"]
    env = {**os.environ, "PYTHONPATH": str(blocked.parent)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: the overview draws with matplotlib: pip install -r benchmarks/requirements.txt"
    ]
    assert not (tmp_path / "runs").exists()


def plateau_v(step: int) -> float:
    """Mean V rising to 50 by step 50,000, then 3% short of it until step 100,000, then 50."""
    return step / 1000 if step <= 50_000 else 48.5 if step <= 100_000 else 50.0


def test_settling_names_where_v_stays_within_each_tolerance_and_none_while_it_still_moves():
    steps = range(1000, 200_001, 1000)
    assert tables.settling({s: {"v_mean": plateau_v(s)} for s in steps}) == (50.0, [50_000, 100_000])
    # the 10,000-step window ending at 50,000 averages 45.5, 9% short: V settles at 50,000, not before
    assert tables.settling({s: {"v_mean": -plateau_v(s)} for s in steps}) == (-50.0, [50_000, 100_000])
    # still rising at the end: the window before the last averages 185.5, 5.1% below the last (195.5)
    final, settled = tables.settling({s: {"v_mean": s / 1000} for s in steps})
    assert (final, settled) == (195.5, [None, None])


def test_settling_table_reads_a_runs_metrics_and_names_its_seeds(tmp_path):
    records = [{"phase": "train", "step": s, "charts/v_mean": plateau_v(s)} for s in range(1000, 200_001, 1000)]
    records.append({"phase": "posthoc", "step": 1000, "charts/v_mean": 0.0})  # the post-hoc actor's phase has no V
    args = {"seed": 4, "num_seeds": 3, "total_steps": 200_000, "posthoc_steps": 1000}
    fake_run(tmp_path, "iql__4-6", args, {}, records)
    runs = tables.load_runs([str(tmp_path)])
    table = tables.settling_table(runs, tables.training_metrics([], [str(tmp_path)])).splitlines()
    assert table[2] == "| `local/fake/medium-v0` | 200,000 | 4-6 (mean) | 50.00 | 50,000 | 100,000 |"
    assert len(table) == 3


def test_the_nine_published_rows_hold_each_local_datasets_runs_beside_the_papers_and_the_blogs(tmp_path):
    dataset = {"env_id": "local/walker2d/medium-replay-v0"}
    for seed in (1, 2):  # scores 41 and 42
        fake_run(tmp_path, f"bc__{seed}", {**dataset, "seed": seed}, {"data_selection": {"top_fraction": 1.0}}, [], "bc")
    iql_scores = {"concurrent": {"score_mean": 60.0}, "posthoc": {"score_mean": 70.0}}
    fake_run(tmp_path, "iql__1", dataset, {"policies": iql_scores}, [])
    fake_run(tmp_path / "other", "bc__9", {"seed": 9}, {"data_selection": {"top_fraction": 1.0}}, [], "bc")  # not one of nine
    (tmp_path / "commit.txt").write_text("bbbbbbbbbbbbbbbb\n")
    # the data column puts the dataset's mean return on the score scale: 100 * (500.6 - 0.4) / (4151.7 - 0.4) = 12.0
    records = {dataset["env_id"]: {"return_mean": 500.6, "ref_min_score": 0.4, "ref_max_score": 4151.7}}
    lines = tables.published_table(tables.load_runs([str(tmp_path)]), 15000, records).splitlines()
    assert len(lines) == 2 + 9 + 2 and lines[0].startswith("| dataset | data | BC | 10% BC | IQL (post-hoc) | paper: BC |")
    assert lines[2] == "| halfcheetah `medium` | – | – | – | – | 42.6 | 42.5 | 47.4 | 42.4 | 42.9 | 46.6 |"
    assert lines[7] == (
        "| walker2d `medium-replay` | 12.0 | 41.5 ± 0.5 | – | 60.0 ± 0.0 (70.0 ± 0.0) "
        "| 26.0 | 62.5 | 73.9 | 11.8 | 47.6 | 62.6 |"
    )
    assert lines[-1] == "Code: commit bbbbbbbbbbbb."
    # rows made by two versions of the code: each commit names its datasets
    fake_run(tmp_path / "hopper", "iql__1", {"env_id": "local/hopper/medium-v0"}, {"policies": iql_scores}, [])
    (tmp_path / "hopper" / "commit.txt").write_text("aaaaaaaaaaaaaaaa\n")
    lines = tables.published_table(tables.load_runs([str(tmp_path), str(tmp_path / "hopper")]), 15000, records).splitlines()
    assert lines[3].startswith("| hopper `medium` | – | – | – | 60.0 ± 0.0 (70.0 ± 0.0) |")
    assert (
        lines[-1]
        == "Code: commit aaaaaaaaaaaa (local/hopper/medium-v0); commit bbbbbbbbbbbb (local/walker2d/medium-replay-v0)."
    )
    assert tables.published_table(tables.load_runs([str(tmp_path / "other")]), 15000, records) is None
    assert len(tables.load_runs([str(tmp_path / "other")])) == 1


def test_wall_time_sums_each_methods_runs_per_dataset_and_budget(tmp_path):
    bc_selection = {"data_selection": {"top_fraction": 1.0}}
    for seed in (1, 2):  # two solo BC runs of half an hour each
        fake_run(tmp_path, f"bc__{seed}", {"seed": seed}, {**bc_selection, "wall_time_s": 1800.0}, [], "bc")
    fake_run(tmp_path, "iql__1-3", {"num_seeds": 3}, {"wall_time_s": 7200.0}, [])  # three seeds in one run of two hours
    fake_run(tmp_path, "iql__9", {"seed": 9, "total_steps": 30000}, {"wall_time_s": 900.0}, [])  # another budget
    fake_run(tmp_path, "bc__8", {"seed": 8}, bc_selection, [], "bc")  # an old summary without wall_time_s
    lines = tables.wall_time_table(tables.load_runs([str(tmp_path)])).splitlines()
    assert lines == [
        "| dataset | gradient steps | BC | IQL | all |",
        "|---|---|---|---|---|",
        "| local/fake/medium-v0 | 15,000 | 1.00 (2) | 2.00 (3) | 3.00 |",
        "| local/fake/medium-v0 | 30,000 | – | 0.25 (1) | 0.25 |",
    ]
