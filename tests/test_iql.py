import json
import math
import os
import subprocess
import sys

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch

import iql

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(script, *flags, cwd, env=None):
    env = {**(env or os.environ), "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, os.path.join(REPO, script), *flags], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


# ------------------------------------------------------------------ data
def test_flattening_keeps_transitions_aligned(minari_store):
    dataset = minari.load_dataset("mujoco/hopper/tiny-v0")
    data = iql.flatten_dataset(dataset)
    episodes = list(dataset.iterate_episodes())
    assert len(data.rewards) == dataset.total_steps == sum(len(e.rewards) for e in episodes)
    assert data.observations.shape == (dataset.total_steps + len(episodes), 11)
    assert data.observations.dtype == np.float32
    t = 0
    for episode in episodes:
        for j in range(len(episode.rewards)):
            row = data.obs_rows[t]
            np.testing.assert_allclose(data.observations[row], episode.observations[j], rtol=1e-6)
            np.testing.assert_allclose(data.observations[row + 1], episode.observations[j + 1], rtol=1e-6)
            np.testing.assert_allclose(data.actions[t], episode.actions[j])
            t += 1
    # the final (T+1-th) observation of an episode is never the s of a transition
    assert len(set(data.obs_rows.tolist())) == len(data.obs_rows)
    np.testing.assert_allclose(data.episode_returns, [e.rewards.sum() for e in episodes], rtol=1e-5)

    # truncated final steps are kept and bootstrap; terminal ones do not
    buffer = iql.DeviceData(data, data.rewards, data.actions, torch.device("cpu"), seeds=[0])
    assert data.truncations.sum() > 0 and data.terminations.sum() > 0
    assert torch.all(buffer.masks[torch.as_tensor(data.truncations)] == 1.0)
    assert torch.all(buffer.masks[torch.as_tensor(data.terminations)] == 0.0)
    batch = buffer.sample(64)
    rows = buffer.obs_rows  # every sampled (s, s') pair is a real consecutive pair of the dataset
    pairs = {(tuple(data.observations[r]), tuple(data.observations[r + 1])) for r in rows.tolist()}
    assert all((tuple(s.tolist()), tuple(s2.tolist())) in pairs for s, s2 in zip(batch.obs[0], batch.next_obs[0]))


def test_dict_observations_flatten_like_gymnasium():
    space = gym.spaces.Dict(
        {
            "observation": gym.spaces.Box(-1, 1, (4,)),
            "desired_goal": gym.spaces.Dict({"kettle": gym.spaces.Box(-1, 1, (2,)), "burner": gym.spaces.Box(-1, 1, (3,))}),
            "achieved_goal": gym.spaces.Box(-1, 1, (2, 1)),
        }
    )
    space.seed(0)
    samples = [space.sample() for _ in range(5)]
    batched = {
        "observation": np.stack([s["observation"] for s in samples]),
        "achieved_goal": np.stack([s["achieved_goal"] for s in samples]),
        "desired_goal": {k: np.stack([s["desired_goal"][k] for s in samples]) for k in ("kettle", "burner")},
    }
    expected = np.stack([gym.spaces.flatten(space, s) for s in samples])
    np.testing.assert_allclose(iql.flatten_observation(batched, space), expected)


# ------------------------------------------------------------------ losses
def test_expectile_loss_by_hand():
    u = torch.tensor([2.0, -1.0, 0.5])
    assert iql.expectile_loss(u, 0.5).item() == pytest.approx((0.5 * u**2).mean().item())
    # u >= 0 weighs tau, u < 0 weighs 1 - tau
    assert iql.expectile_loss(u, 0.9).item() == pytest.approx((0.9 * 4 + 0.1 * 1 + 0.9 * 0.25) / 3)
    assert iql.expectile_loss(u, 0.1).item() == pytest.approx((0.1 * 4 + 0.9 * 1 + 0.1 * 0.25) / 3)


def test_critic_loss_sums_the_twins():
    q = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
    target = torch.tensor([1.0, 1.0])
    assert iql.critic_loss(q, target).item() == pytest.approx((0 + 1) / 2 + (1 + 9) / 2)
    # with a seed axis, the seeds' losses add up
    assert iql.critic_loss(torch.stack([q, q + 1]), torch.stack([target, target])).item() == pytest.approx(
        5.5 + (1 + 4) / 2 + (0 + 16) / 2
    )
    assert iql.expectile_loss(torch.tensor([[2.0, -1.0], [1.0, 1.0]]), 0.9).item() == pytest.approx((0.9 * 4 + 0.1) / 2 + 0.9)


def test_actor_loss_by_hand():
    mean = torch.tensor([[0.0, 0.5]])
    log_std = torch.tensor([[0.0, math.log(2.0)]])
    actions = torch.tensor([[1.0, -0.5]])
    # N(1; 0, 1) and N(-0.5; 0.5, 2^2), summed over dimensions
    expected_log_prob = (-0.5 - 0.5 * math.log(2 * math.pi)) + (-0.5 * 0.25 - math.log(2.0) - 0.5 * math.log(2 * math.pi))
    log_prob = iql.gaussian_log_prob(mean, log_std, actions)
    assert log_prob.item() == pytest.approx(expected_log_prob)

    adv = torch.tensor([0.5, 10.0, -1.0])
    weights = iql.awr_weights(adv, temperature=3.0, exp_adv_max=100.0)
    np.testing.assert_allclose(weights.numpy(), [math.exp(1.5), 100.0, math.exp(-3.0)], rtol=1e-6)
    log_probs = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    loss = iql.actor_loss(log_probs, weights)
    assert loss.item() == pytest.approx((math.exp(1.5) * 1 + 100 * 2 + math.exp(-3.0) * 3) / 3, rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(log_probs.grad.numpy(), -weights.numpy() / 3, rtol=1e-6)


def test_actor_mean_is_squashed_and_log_std_clipped():
    actor = iql.Actor(3, 2, (16,), dropout=0.0, state_dependent_std=False)
    with torch.no_grad():
        actor.mean.biases[0].fill_(100.0)
        actor.log_std.copy_(torch.tensor([-10.0, 10.0]))
    mean, log_std = actor(torch.randn(1, 4, 3))
    assert torch.all(mean <= 1.0) and torch.all(mean > 0.99)
    assert log_std.tolist() == [[[-5.0, 2.0]] * 4]


def test_reward_normalization_modes():
    returns = np.array([10.0, 60.0, 35.0])
    assert iql.reward_transform("locomotion", returns) == (pytest.approx(1000.0 / 50.0), 0.0)
    assert iql.reward_transform("antmaze", returns) == (1.0, -1.0)
    assert iql.reward_transform("none", returns) == (1.0, 0.0)

    def resolved(env_id, mode="auto"):
        return iql.resolve_paper_settings(iql.Args(env_id=env_id, reward_normalization=mode))[0].reward_normalization

    assert resolved("mujoco/hopper/medium-v0") == "locomotion"
    assert resolved("D4RL/antmaze/umaze-v1") == "antmaze"
    assert resolved("D4RL/pen/human-v2") == "none"
    assert resolved("mujoco/hopper/medium-v0", "none") == "none"
    with pytest.raises(SystemExit, match="same return"):
        iql.reward_transform("locomotion", np.array([5.0, 5.0]))


def test_twin_q_is_independent_networks_two_per_seed():
    critic = iql.Ensemble(5, (8, 8), 1, members=4)  # two seeds
    obs, act = torch.randn(2, 6, 3), torch.randn(2, 6, 2)
    q = iql.twin_q(critic, obs, act)
    assert q.shape == (2, 2, 6)
    for seed, twin in np.ndindex(
        2, 2
    ):  # member 2 seed + twin is a plain MLP with that slice of each weight, fed its seed's batch
        x = torch.cat([obs[seed], act[seed]], 1)
        for i, (w, b) in enumerate(zip(critic.weights, critic.biases)):
            x = x @ w[2 * seed + twin] + b[2 * seed + twin]
            x = torch.relu(x) if i < len(critic.weights) - 1 else x
        torch.testing.assert_close(q[seed, twin], x.squeeze(-1))
    # orthogonal weights (gain sqrt 2) and zero biases, as the official code initialises its layers
    w = critic.weights[1][3]
    torch.testing.assert_close(w.T @ w, 2.0 * torch.eye(8), atol=1e-5, rtol=1e-5)
    assert all(not b.any() for b in critic.biases)


# ------------------------------------------------------------------ the paper's central claim
def train_toy(expectile, runs_dir, bf16=False):
    summary = iql.main(
        iql.Args(
            env_id="toy/twostep/fifty-v0",
            expectile=expectile,
            temperature=3.0,
            total_steps=1500,
            batch_size=64,
            hidden_dims=(64, 64),
            value_lr=1e-3,
            critic_lr=1e-3,
            actor_lr=1e-3,
            eval_freq=0,
            final_eval_episodes=2,
            log_freq=500,
            save_model=True,
            runs_dir=str(runs_dir),
            cuda=False,
            bf16=bf16,
        )
    )
    checkpoint = torch.load(os.path.join(runs_dir, summary["run_name"], "model.pt"), weights_only=True)
    value = iql.Ensemble(3, (64, 64), 1, members=1)
    value.load_state_dict(checkpoint["networks"]["value"])
    with torch.no_grad():
        v = value(torch.eye(3)[None]).squeeze(-1)[0]
    return summary["policies"]["concurrent"]["return_mean"], v


def test_two_step_mdp_sarsa_goes_down_iql_goes_up(minari_store, tmp_path):
    sarsa_return, sarsa_v = train_toy(0.5, tmp_path)
    iql_return, iql_v = train_toy(0.9, tmp_path)
    # V(s1) = 10 * (2 * tau - 1): 0 for SARSA, 8 for expectile 0.9; V(s2) = 1 either way
    assert abs(sarsa_v[1].item()) < 1.0
    assert iql_v[1].item() == pytest.approx(8.0, abs=1.0)
    assert sarsa_v[2].item() == pytest.approx(1.0, abs=0.2) and iql_v[2].item() == pytest.approx(1.0, abs=0.2)
    assert sarsa_return == 1.0  # down at s0, then +1
    assert iql_return == 10.0  # up, up


# ------------------------------------------------------------------ end to end
def test_cli_runs_end_to_end_with_both_extractions(minari_store, tmp_path):
    result = run_cli(
        "iql.py",
        "--env-id",
        "mujoco/hopper/tiny-v0",
        "--total-steps",
        "60",
        "--batch-size",
        "32",
        "--hidden-dims",
        "32",
        "32",
        "--policy-extraction",
        "both",
        "--posthoc-steps",
        "40",
        "--eval-freq",
        "30",
        "--eval-episodes",
        "2",
        "--final-eval-episodes",
        "3",
        "--log-freq",
        "20",
        "--save-model",
        "--runs-dir",
        "runs",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["policies"]) == {"concurrent", "posthoc"}
    for policy in summary["policies"].values():
        assert policy["num_episodes"] == 3
        # the tiny dataset carries no reference scores: the D4RL Hopper ones are used
        ref_min, ref_max = iql.D4RL_REFERENCE_RETURNS["hopper"]
        assert policy["score_mean"] == pytest.approx(100 * (policy["return_mean"] - ref_min) / (ref_max - ref_min))
    assert summary["scoring"]["kind"] == "return" and "D4RL reference returns of hopper" in summary["scoring"]["source"]
    assert (
        summary["updates_per_second"] > 0
        and summary["wall_time_s"] > summary["train_time_s"] + summary["eval_time_s"] > summary["eval_time_s"] > 0
    )
    assert summary["updates_per_second"] == pytest.approx(
        100 / summary["train_time_s"]
    )  # V/Q and post-hoc updates, evaluation excluded
    assert json.loads((run_dir / "args.json").read_text())["posthoc_steps"] == 40
    history = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    # each policy's own update count: the post-hoc actor's start after the V/Q steps
    assert [(h["policy"], h["step"], h["final"]) for h in history] == [
        ("concurrent", 30, False),
        ("posthoc", 30, False),
        ("concurrent", 60, True),
        ("posthoc", 40, True),
    ]
    checkpoint = torch.load(run_dir / "model.pt", weights_only=True)
    assert set(checkpoint["networks"]) == {"value", "critic", "target_critic", "actor_concurrent", "actor_posthoc"}
    assert {"optimizers", "schedulers", "normalization", "args", "rng", "progress"} <= set(checkpoint)
    assert checkpoint["args"]["reward_normalization"] == "locomotion"  # `auto`, resolved


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, os.path.join(REPO, "iql.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for field in iql.Args.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in result.stdout
    assert result.stdout.count("(default:") + result.stdout.count("(required)") >= len(iql.Args.__dataclass_fields__) - 2


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--expectile", "1.0"], "--expectile must be in (0, 1), got 1.0"),
        (["--expectile", "0"], "--expectile must be in (0, 1), got 0.0"),
        (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
        (["--total-steps", "0"], "--total-steps must be positive, got 0"),
        (["--batch-size", "-5"], "--batch-size must be positive, got -5"),
        # each message names the one flag that is wrong and the value it was given
        (["--actor-lr", "-1"], "--actor-lr must be positive, got -1.0"),
        (["--critic-lr", "0"], "--critic-lr must be positive, got 0.0"),
        (["--value-lr", "-0.001"], "--value-lr must be positive, got -0.001"),
        (["--eval-episodes", "0"], "--eval-episodes must be positive, got 0"),
        (["--final-eval-episodes", "-2"], "--final-eval-episodes must be positive, got -2"),
        (["--log-freq", "0"], "--log-freq must be positive, got 0"),
        (["--torch-threads", "0"], "--torch-threads must be positive, got 0"),
    ],
)
def test_bad_arguments_fail_before_any_work(flags, message, tmp_path):
    with pytest.raises(SystemExit) as error:
        iql.main(iql.Args(env_id="does/not/exist-v0", runs_dir=str(tmp_path / "runs"), **parse(flags)))
    assert str(error.value) == f"error: {message}"
    assert not (tmp_path / "runs").exists()


def parse(flags):
    import tyro

    return {
        k: v
        for k, v in vars(tyro.cli(iql.Args, args=flags)).items()
        if k in {f.lstrip("-").replace("-", "_") for f in flags[::2]}
    }


def test_unknown_dataset_offline_is_one_clear_line_and_no_run_folder(minari_store, tmp_path):
    result = run_cli("iql.py", "--env-id", "mujoco/nothing/here-v0", cwd=tmp_path)  # HF_HUB_OFFLINE=1 (conftest)
    assert result.returncode != 0 and not (tmp_path / "runs").exists()
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: Minari dataset 'mujoco/nothing/here-v0' is not in the local store")
    assert "HF_HUB_OFFLINE is set, so it was not downloaded" in line and "minari list local" in line
    # no download is tried, no advice to set what is set, nothing from huggingface_hub, nothing close to suggest
    assert result.stdout == "" and "HF_HUB_OFFLINE=1" not in line and "Did you mean" not in line


def test_mistyped_dataset_gets_the_closest_stored_ids_once(minari_store, tmp_path, capsys, monkeypatch):
    result = run_cli("bc.py", "--env-id", "mujoco/hoper/tiny-v0", cwd=tmp_path)
    assert result.returncode != 0 and not (tmp_path / "runs").exists()
    (line,) = result.stderr.strip().splitlines()
    assert (result.stdout + line).count("Did you mean") == 1 and "Did you mean mujoco/hopper/tiny-v0" in line
    # online, the hint comes at once, before the download, whose error then does not repeat it
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(dataset_id, download=False):
        raise ConnectionError("no network")

    monkeypatch.setattr(minari, "load_dataset", no_network)
    with pytest.raises(SystemExit) as stopped:
        iql.load_minari_dataset("mujoco/hoper/tiny-v0")
    printed = capsys.readouterr().out
    assert printed.startswith("Minari dataset 'mujoco/hoper/tiny-v0' is not in the local store")
    assert printed.count("Did you mean") == 1 and "Did you mean mujoco/hopper/tiny-v0" in printed
    assert printed.strip().endswith("? Downloading it...")
    assert "could not be downloaded (ConnectionError: no network)" in str(stopped.value)
    assert "Did you mean" not in str(stopped.value) and "HF_HUB_OFFLINE=1 to fail at once" in str(stopped.value)
    monkeypatch.undo()
    # a stored id loads without a word and without trying the network
    assert iql.load_minari_dataset("mujoco/hopper/tiny-v0").total_episodes == 12
    assert capsys.readouterr().out == ""


def test_non_box_action_space_is_rejected(minari_store, tmp_path):
    with pytest.raises(SystemExit, match="continuous \\(Box\\) action space"):
        iql.main(iql.Args(env_id="toy/cartpole/tiny-v0", runs_dir=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()


def test_each_training_seed_evaluates_on_its_own_start_states(minari_store, tmp_path, monkeypatch):
    calls, evaluate = [], iql.evaluate

    def recording(actor, envs, first_seeds, *rest):
        calls.append((first_seeds, len(envs[0])))
        return evaluate(actor, envs, first_seeds, *rest)  # first_seeds: one per training seed

    monkeypatch.setattr(iql, "evaluate", recording)
    finals = []
    for seed, num_seeds in ((1, 1), (2, 1), (1, 1), (4, 2)):
        summary = iql.main(
            iql.Args(
                env_id="mujoco/hopper/tiny-v0",
                seed=seed,
                num_seeds=num_seeds,
                total_steps=20,
                batch_size=16,
                hidden_dims=(8,),
                eval_freq=10,
                eval_episodes=2,
                final_eval_episodes=3,
                runs_dir=str(tmp_path),
                cuda=False,
            )
        )
        finals.append(summary["policies"]["concurrent"]["return_mean"])
    # env seeds 10_000 * seed + i: periodic and final evaluations of a seed share its block, other seeds never touch it
    assert calls == [
        ([10_000], 2),
        ([10_000], 3),
        ([20_000], 2),
        ([20_000], 3),
        ([10_000], 2),
        ([10_000], 3),
        ([40_000, 50_000], 2),
        ([40_000, 50_000], 3),
    ]
    assert finals[0] == finals[2]  # reproducible
    with pytest.raises(
        SystemExit, match="--final-eval-episodes must be at most 10000, the evaluation seeds of one training seed, got 10001"
    ):
        iql.main(iql.Args(env_id="mujoco/hopper/tiny-v0", final_eval_episodes=10_001, runs_dir=str(tmp_path)))
