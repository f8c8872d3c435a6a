"""--online-steps: online fine-tuning after the offline phases, as the official train_finetune.py."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import iql
from tests.test_iql import REPO, run_cli
from tests.test_long_runs import SMALL, crash, records
from tests.test_num_seeds import toy_data

HOPPER = "mujoco/hopper/tiny-v0"  # evaluation (and online) episodes of 40 steps; Hopper falls, which terminates
ONLINE = dict(env_id=HOPPER, total_steps=30, online_steps=60, batch_size=16, hidden_dims=(16, 16), log_freq=30, cuda=False)
ONLINE.update(eval_freq=0, final_eval_episodes=2)


def online_run(tmp_path, **flags) -> tuple:
    """A finished online run: its summary, final checkpoint and per-episode records from metrics.jsonl."""
    summary = iql.main(iql.Args(**{**ONLINE, **flags}, runs_dir=str(tmp_path)))
    run_dir = tmp_path / summary["run_name"]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return summary, checkpoint, [m for m in metrics if "charts/online_return" in m]


def stored(checkpoint: dict, seed_index: int = 0) -> dict:
    """Seed k's online transitions from a checkpoint, by part."""
    obs_dim, act_dim = checkpoint["obs_dim"], checkpoint["act_dim"]
    rows = checkpoint["replay"]["online_transitions"]["online"][seed_index]
    parts = rows.split([obs_dim, act_dim, 1, 1, obs_dim], dim=-1)
    return dict(zip(["obs", "actions", "rewards", "masks", "next_obs"], parts))


def test_online_transitions_are_stored_as_the_dataset_is(minari_store, tmp_path):
    # seed 1's policy keeps Hopper up until the 40-step time limit, seed 2's falls: both ends of an episode occur
    summary, checkpoint, episodes = online_run(tmp_path, seed=1, num_seeds=2)
    scale, shift = checkpoint["normalization"]["reward_scale"], checkpoint["normalization"]["reward_shift"]
    assert scale != 1.0 and shift == 0.0  # locomotion: r x 1000 / range of the dataset's returns
    lengths = [e["charts/online_length"] for e in episodes]
    assert 40 in lengths and min(lengths) < 40, lengths
    for k, seed in enumerate((1, 2)):
        transitions, mine = stored(checkpoint, k), [e for e in episodes if e["seed"] == seed]
        assert len(transitions["obs"]) == 60  # one per online step, none lost or repeated
        # consecutive steps chain (s' of one is s of the next) except where an episode ended and a fresh one began
        ends = [e["step"] for e in mine]
        for t in range(59):
            chained = torch.equal(transitions["next_obs"][t], transitions["obs"][t + 1])
            assert chained == (t + 1 not in ends), t
        # the mask is 0 only on a termination (a fall before the 40-step limit), 1 on the time limit's truncation
        masks = transitions["masks"].squeeze(-1)
        for episode in mine:
            assert masks[episode["step"] - 1] == (0.0 if episode["charts/online_length"] < 40 else 1.0)
        assert masks.sum() == 60 - sum(e["charts/online_length"] < 40 for e in mine)
        # rewards take the dataset's transform, then sum to the episode's return
        start = 0
        for episode in mine:
            rewards = transitions["rewards"][start : episode["step"]].double()
            assert (rewards.sum() / scale).item() == pytest.approx(episode["charts/online_return"], rel=1e-5)
            start = episode["step"]
    # actions are mapped to [-1, 1] as the dataset's, clipped inside it; they are samples, not the policy's mean
    actions = torch.stack([stored(checkpoint, k)["actions"] for k in range(2)])
    assert actions.abs().max() < 1.0
    actor = iql.Actor(11, 3, (16, 16), 0.0, False, members=2)
    actor.load_state_dict(checkpoint["networks"]["actor_concurrent"])
    with torch.no_grad():
        means = actor(torch.stack([stored(checkpoint, k)["obs"] for k in range(2)]))[0]
    assert (actions - means).abs().mean() > 0.1
    # the offline policy's result beside the fine-tuned one
    assert list(summary["policies"]) == ["offline", "concurrent"]
    assert checkpoint["progress"]["phase"] == "done"


def test_maze_online_rewards_are_shifted_as_the_dataset_is(minari_store, tmp_path):
    flags = dict(env_id="D4RL/antmaze/umaze-tiny-v0", total_steps=5, online_steps=20, hidden_dims=(8,))
    _, checkpoint, _ = online_run(tmp_path, **flags)
    rewards = stored(checkpoint)["rewards"].squeeze(-1)
    assert checkpoint["normalization"]["reward_shift"] == -1.0
    assert set(rewards.tolist()) <= {-1.0, 0.0}  # AntMaze's sparse 0/1 reward, minus 1


def test_minibatches_draw_uniformly_from_the_dataset_and_each_seeds_online_transitions():
    data = toy_data(np.random.default_rng(0))  # 50 transitions, observations of 5, actions of 2
    buffer = iql.DeviceData(data, data.rewards, data.actions, torch.device("cpu"), seeds=[1, 2], online_steps=50)
    for step in range(50):  # seed k's online transitions: observations 100 k + step, s' = s + 0.5, reward -step
        obs = torch.tensor([[100.0 + step] * 5, [200.0 + step] * 5])
        row = [torch.full((2, 2), 0.5), torch.tensor([[-step], [-step]]), torch.zeros(2, 1), obs + 0.5]
        buffer.append(torch.cat([obs, *row], dim=1).float())
    batch = buffer.sample(4000)
    from_online = batch.obs[..., 0] >= 100
    assert 0.45 < from_online.float().mean() < 0.55  # 50 of 100 transitions
    for k in range(2):  # each seed's own store only, each transition whole
        online = from_online[k]
        assert ((batch.obs[k, online, 0] >= 100 * (k + 1)) & (batch.obs[k, online, 0] < 100 * (k + 1) + 50)).all()
        torch.testing.assert_close(batch.next_obs[k, online], batch.obs[k, online] + 0.5)
        torch.testing.assert_close(batch.rewards[k, online], -(batch.obs[k, online, 0] - 100 * (k + 1)))
        assert (batch.masks[k, online] == 0).all() and (batch.actions[k, online] == 0.5).all()
        offline = ~online
        assert (
            batch.masks[k, offline] == torch.as_tensor(1.0 - data.terminations[batch_index(data, batch, k, offline)])
        ).all()


def batch_index(data, batch, k, which) -> np.ndarray:
    """The dataset transitions a minibatch drew, found by their observation."""
    observations = torch.as_tensor(data.observations[data.obs_rows], dtype=batch.obs.dtype)
    return np.array([int((observations == o).all(-1).nonzero()[0, 0]) for o in batch.obs[k, which]])


def test_exploration_samples_each_seeds_gaussian_within_the_bounds():
    actor = iql.Actor(5, 3, (16,), 0.0, False, members=2, generators=[torch.Generator().manual_seed(s) for s in (1, 2)])
    obs = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    samples = np.stack([iql.explore(actor, obs, generators, torch.device("cpu")) for _ in range(500)])
    with torch.no_grad():
        mean = actor(torch.as_tensor(obs).unsqueeze(1))[0][:, 0].numpy()
    assert np.abs(samples).max() <= 1.0 and np.abs(samples).max() == 1.0  # std 1: clipped to [-1, 1]
    assert np.abs(samples - mean).mean() > 0.3 and actor.training
    # the same generators give the same samples: each seed's noise is its own stream
    again = [torch.Generator().manual_seed(s) for s in (1, 2)]
    np.testing.assert_array_equal(iql.explore(actor, obs, again, torch.device("cpu")), samples[0])


def test_each_seed_fine_tunes_as_it_would_alone(minari_store, tmp_path):
    flags = dict(policy_extraction="both", posthoc_steps=10, eval_freq=30, eval_episodes=2, save_model=True)
    together, checkpoint, episodes = online_run(tmp_path / "together", seed=3, num_seeds=2, **flags)
    run_dir = tmp_path / "together" / together["run_name"]
    for k, seed in enumerate((3, 4)):
        alone, alone_checkpoint, alone_episodes = online_run(tmp_path / str(seed), seed=seed, **flags)
        torch.testing.assert_close(stored(checkpoint, k)["obs"], stored(alone_checkpoint)["obs"], rtol=1e-5, atol=1e-5)
        for name, state in alone_checkpoint["networks"].items():
            per_seed = 2 if "critic" in name else 1
            for key, tensor in state.items():
                mine = checkpoint["networks"][name][key][k * per_seed : (k + 1) * per_seed]
                torch.testing.assert_close(mine, tensor, rtol=1e-4, atol=1e-5)
        assert [{**e, "seed": seed} for e in episodes if e["seed"] == seed] == [
            pytest.approx({**e, "seed": seed}, rel=1e-4) for e in alone_episodes
        ]
        for policy, result in alone["policies"].items():
            assert together["policies"][policy]["seeds"][k] == pytest.approx({"seed": seed, **result}, rel=1e-4)
    # the evaluations name the actor's own updates: 30 offline, then 30 and 60 online
    steps = {(r["policy"], r["step"], r["final"]) for r in records(run_dir)}
    assert steps == {("offline", 30, False), ("concurrent", 60, False), ("concurrent", 90, True), ("posthoc", 10, True)}


def test_a_run_resumed_in_the_online_phase_keeps_every_stored_transition_once(minari_store, tmp_path):
    # checkpoints at offline step 40, online steps 40 and 80: killed before the third, so resumed at online step 40
    flags = [*SMALL, "--total-steps", "40", "--online-steps", "100", "--checkpoint-freq", "40", "--eval-freq", "0"]
    (tmp_path / "straight").mkdir()
    (tmp_path / "crashed").mkdir()
    assert run_cli("iql.py", *flags, cwd=tmp_path / "straight").returncode == 0
    (straight,) = (tmp_path / "straight" / "runs").iterdir()
    crashed = crash("iql", 3, *flags, cwd=tmp_path / "crashed")
    at_stop = torch.load(crashed / "checkpoint.pt", weights_only=True)
    assert (at_stop["progress"]["phase"], at_stop["progress"]["step"]) == ("online", 40)
    result = run_cli("iql.py", "--resume", str(crashed), cwd=tmp_path / "crashed")
    assert result.returncode == 0, result.stderr
    assert "resuming at online step 40" in result.stdout
    final, reference = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (crashed, straight))
    online = final["replay"]["online_transitions"]["online"]
    assert online.shape[1] == 100
    # the 40 transitions stored before the stop are kept, once; they are the uninterrupted run's
    assert torch.equal(online[:, :40], at_stop["replay"]["online_transitions"]["online"])
    assert torch.equal(online[:, :40], reference["replay"]["online_transitions"]["online"][:, :40])
    # then a fresh episode: the one in progress at the stop is abandoned
    assert not torch.equal(online[0, 40, :11], reference["replay"]["online_transitions"]["online"][0, 40, :11])
    metrics = [json.loads(line) for line in open(crashed / "metrics.jsonl")]
    assert [m["step"] for m in metrics if m["phase"] == "online" and "seed" not in m] == [100]  # --log-freq 100
    assert json.loads((crashed / "summary.json").read_text())["policies"].keys() == {"offline", "concurrent"}


def test_without_online_steps_a_run_is_the_offline_run_it_was(minari_store, tmp_path, capsys):
    summary, checkpoint, episodes = online_run(tmp_path, online_steps=0, policy_extraction="both", posthoc_steps=10)
    run_dir = tmp_path / summary["run_name"]
    assert summary["policies"].keys() == {"concurrent", "posthoc"} and episodes == []
    assert {r["policy"] for r in records(run_dir)} == {"concurrent", "posthoc"}
    assert {json.loads(line)["phase"] for line in open(run_dir / "metrics.jsonl")} == {"train", "posthoc"}
    printed = capsys.readouterr().out.splitlines()
    assert not [line for line in printed if line.startswith(("online", "eval offline"))] and "replay" not in checkpoint
    assert checkpoint["schedulers"]["concurrent"]["T_max"] == 30  # the offline cosine, over the offline steps
    # minibatches: each seed's generator draws the dataset rows it drew before there was an online store
    data = toy_data(np.random.default_rng(0))
    buffer = iql.DeviceData(data, data.rewards, data.actions, torch.device("cpu"), seeds=[1, 2], online_steps=0)
    batch = buffer.sample(64)
    for k, seed in enumerate((1, 2)):
        rows = torch.as_tensor(data.obs_rows)[torch.randint(50, (64,), generator=torch.Generator().manual_seed(seed))]
        torch.testing.assert_close(batch.obs[k], torch.as_tensor(data.observations)[rows].to(batch.obs.dtype))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--online-steps", "-5"], "error: --online-steps must be >= 0, got -5"),
        (
            ["--online-steps", "10", "--policy-extraction", "posthoc"],
            "error: --online-steps fine-tunes the concurrent actor, which --policy-extraction posthoc does not train",
        ),
    ],
)
def test_bad_online_flags_are_one_line_before_any_work(flags, message, tmp_path):
    result = run_cli("iql.py", "--env-id", "no/such/dataset-v0", *flags, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "runs").exists()


def test_a_resumed_run_keeps_its_online_steps_and_the_schedule_follows_the_official_configs(minari_store, tmp_path):
    summary = iql.main(iql.Args(**{**ONLINE, "online_steps": 0}, runs_dir=str(tmp_path)))
    run_dir = tmp_path / summary["run_name"]
    (run_dir / "summary.json").unlink()  # as if stopped at the end of training
    with pytest.raises(SystemExit, match="--online-steps 10 differs from the run's 0"):
        iql.main(iql.Args(resume=str(run_dir), online_steps=10), named_flags={"resume", "online_steps"})
    # a checkpoint from before --online-steps existed resumes, without an online phase
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    del checkpoint["args"]["online_steps"]
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    assert iql.main(iql.Args(resume=str(run_dir)), named_flags={"resume"})["policies"].keys() == {"concurrent"}
    # offline: the official cosine decay; online fine-tuning: constant, unless a cosine is asked for
    args = json.loads((run_dir / "args.json").read_text())
    assert args["actor_lr_schedule"] == "cosine" and "replay" not in torch.load(run_dir / "checkpoint.pt")
    assert list(summary["policies"]) == ["concurrent"]
    assert iql.resolve_paper_settings(iql.Args(online_steps=10))[0].actor_lr_schedule == "constant"
    given = iql.Args(online_steps=10, actor_lr_schedule="cosine")
    state, _ = iql.make_learner(4, 2, iql.resolve_paper_settings(given)[0], [1], torch.device("cpu"))
    assert state["schedulers"]["concurrent"].T_max == 1_000_010  # over the offline and the online updates


def test_a_fine_tuned_run_in_bfloat16_saves_and_evaluates_its_policies(minari_store, tmp_path, capsys):
    flags = dict(policy_extraction="both", posthoc_steps=10, bf16=True, save_model=True)
    summary, _, _ = online_run(tmp_path, **flags)
    run_dir = tmp_path / summary["run_name"]
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    assert saved["replay"]["online_transitions"]["online"].shape[1] == 60
    capsys.readouterr()
    iql.main(iql.Args(eval_only=str(run_dir)), named_flags={"eval_only"})
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {name: r["step"] for name, r in report["policies"].items()} == {"concurrent": 90, "posthoc": 10}
    assert report["policies"]["concurrent"]["return_mean"] == summary["policies"]["concurrent"]["return_mean"]


def test_sigterm_in_the_online_phase_checkpoints_and_resumes_there(minari_store, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    flags = [*SMALL, "--total-steps", "100", "--online-steps", "1500", "--eval-freq", "0", "--checkpoint-freq", "0"]
    process = subprocess.Popen(
        [sys.executable, "-u", os.path.join(REPO, "iql.py"), *flags],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:  # the first progress line of the online phase
        if line.startswith("online step ") and "/1500" in line:
            break
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert out.strip().splitlines()[-1].startswith("stopped at online step ")
    step = int(out.strip().splitlines()[-1].split()[4].rstrip(";"))
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["progress"]["phase"] == "online" and checkpoint["progress"]["step"] == step
    assert checkpoint["replay"]["online_transitions"]["online"].shape[1] == step
    result = run_cli("iql.py", "--resume", os.path.join("runs", run_dir.name), cwd=tmp_path)
    assert result.returncode == 0 and f"resuming at online step {step}" in result.stdout, result.stderr
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [m["step"] for m in metrics if m["phase"] == "online" and "seed" not in m][-1] == 1500
    assert (run_dir / "summary.json").exists()


def test_a_metric_gone_bad_online_stops_the_run_at_its_step(minari_store, tmp_path, monkeypatch):
    collect = iql.collect
    monkeypatch.setattr(
        iql, "collect", lambda run, step, offset: collect(run, step, offset) * (float("nan") if step == 7 else 1)
    )
    with pytest.raises(SystemExit) as stopped:
        online_run(tmp_path, checkpoint_freq=0)
    assert "env_steps_per_second became NaN or infinite at online step 7; no checkpoint was written" in str(stopped.value)
