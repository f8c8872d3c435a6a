"""--num-seeds N: N seeds trained in lockstep in one process, each exactly as it would train alone."""

import json

import numpy as np
import pytest
import torch

import bc
import iql

HOPPER = "mujoco/hopper/tiny-v0"
TINY = dict(
    env_id=HOPPER, batch_size=16, hidden_dims=(16, 16), log_freq=25, eval_episodes=2, final_eval_episodes=2, cuda=False
)


def toy_data(rng: np.random.Generator, obs_dim=5, act_dim=2, lengths=(30, 20)) -> iql.OfflineData:
    steps, episodes = sum(lengths), len(lengths)
    return iql.OfflineData(
        observations=rng.normal(size=(steps + episodes, obs_dim)),
        actions=rng.uniform(-0.9, 0.9, (steps, act_dim)),
        rewards=rng.normal(size=steps),
        terminations=np.arange(steps) == lengths[0] - 1,
        truncations=np.arange(steps) == steps - 1,
        episode_lengths=np.array(lengths),
    )


def train_iql(seeds: list, extraction: str, steps=50):
    """IQL's updates as main runs them, in float64: per step the metrics, then the networks."""
    args = iql.Args(
        hidden_dims=(16, 16),
        batch_size=8,
        expectile=0.7,
        temperature=3.0,
        actor_dropout=0.0,
        total_steps=steps,
        policy_extraction=extraction,
    )
    data = toy_data(np.random.default_rng(0))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        buffer = iql.DeviceData(data, data.rewards, data.actions, torch.device("cpu"), seeds)
        value, critic, target, actors = iql.make_networks(5, 2, args, seeds, [extraction])
        actor = actors[extraction]
        opts = [iql.make_optimizer(net, 3e-4) for net in (value, critic, actor)]
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opts[2], T_max=steps)
        history = []
        for phase in ["train"] if extraction == "concurrent" else ["train", "posthoc"]:
            for _ in range(steps):
                batch = buffer.sample(args.batch_size)
                if phase == "train":
                    metrics, adv = iql.update_value_and_critic(batch, value, critic, target, opts[0], opts[1], args)
                else:
                    with torch.no_grad():
                        adv = iql.twin_q(target, batch.obs, batch.actions).min(dim=1).values - value(batch.obs).squeeze(-1)
                    metrics = torch.zeros(0)
                if phase == "posthoc" or extraction == "concurrent":
                    metrics = torch.cat([metrics, iql.update_actor(batch, adv, actor, opts[2], scheduler, args)])
                history.append(metrics)
    finally:
        torch.set_default_dtype(default)
    return history, {"value": value, "critic": critic, "target": target, "actor": actor}


def member(net: torch.nn.Module, k: int, per_seed: int = 1) -> list:
    """Seed k's slice of every parameter of an ensemble network (its per_seed members)."""
    return [p[k * per_seed : (k + 1) * per_seed] for p in net.parameters()]


@pytest.mark.parametrize("extraction", ["concurrent", "posthoc"])
def test_each_seed_of_an_ensemble_trains_exactly_as_it_would_alone(extraction):
    together_metrics, together = train_iql([4, 5, 6], extraction)
    alone = [train_iql([seed], extraction) for seed in (4, 5, 6)]
    # the logged metrics are means over seeds of each seed's own
    for step, metrics in enumerate(together_metrics):
        torch.testing.assert_close(metrics, torch.stack([m[step] for m, _ in alone]).mean(0))
    for k, (_, nets) in enumerate(alone):
        for name, net in together.items():
            per_seed = 2 if name in ("critic", "target") else 1
            for mine, its in zip(member(net, k, per_seed), nets[name].parameters(), strict=True):
                torch.testing.assert_close(mine, its, rtol=1e-12, atol=1e-12)
        assert not torch.equal(member(together["actor"], k)[0], member(together["actor"], (k + 1) % 3)[0])  # seeds differ


def test_changing_one_seed_leaves_the_others_untouched():
    _, base = train_iql([4, 5, 6], "concurrent")
    _, changed = train_iql([4, 9, 6], "concurrent")  # the middle seed's initial weights and minibatches change
    for name in base:
        per_seed = 2 if name in ("critic", "target") else 1
        for k in (0, 2):
            for a, b in zip(member(base[name], k, per_seed), member(changed[name], k, per_seed)):
                assert torch.equal(a, b)
        assert not all(torch.equal(a, b) for a, b in zip(member(base[name], 1, per_seed), member(changed[name], 1, per_seed)))


def summary_and_model(module, tmp_path, **kwargs):
    summary = module.main(module.Args(**TINY, runs_dir=str(tmp_path), save_model=True, **kwargs))
    run_dir = tmp_path / summary["run_name"]
    return (
        summary,
        torch.load(run_dir / "model.pt")["networks"],
        [json.loads(line) for line in open(run_dir / "evaluations.jsonl")],
    )


@pytest.mark.parametrize(
    "script, flags", [("iql", dict(policy_extraction="both", posthoc_steps=30)), ("bc", dict(top_fraction=0.5))]
)
def test_a_three_seed_run_is_three_single_seed_runs(script, flags, minari_store, tmp_path):
    module = iql if script == "iql" else bc
    together, networks, records = summary_and_model(
        module, tmp_path / "together", seed=3, num_seeds=3, total_steps=60, eval_freq=30, **flags
    )
    assert together["run_name"].split("__")[-2] == "3-5" and together["seeds"] == [3, 4, 5]
    for k, seed in enumerate((3, 4, 5)):
        alone, alone_networks, alone_records = summary_and_model(
            module, tmp_path / str(seed), seed=seed, total_steps=60, eval_freq=30, **flags
        )
        for name, state in alone_networks.items():
            per_seed = 2 if "critic" in name else 1
            for key, tensor in state.items():
                torch.testing.assert_close(
                    networks[name][key][k * per_seed : (k + 1) * per_seed], tensor, rtol=1e-5, atol=1e-6
                )
        # the same evaluation episodes (each seed its own start states), so the same results, up to float32 rounding
        assert [r for r in records if r["seed"] == seed] == [pytest.approx(r, rel=1e-5) for r in alone_records]
        for policy, result in alone["policies"].items():
            assert together["policies"][policy]["seeds"][k] == pytest.approx({"seed": seed, **result}, rel=1e-5)
    for policy, result in together["policies"].items():
        means = [r["score_mean"] for r in result["seeds"]]
        assert (
            result["num_seeds"] == 3
            and result["score_mean"] == pytest.approx(np.mean(means))
            and result["score_std"] == pytest.approx(np.std(means))
        )


@pytest.mark.parametrize("module", [iql, bc])
def test_num_seeds_must_be_positive(module, tmp_path):
    with pytest.raises(SystemExit, match="--num-seeds must be positive, got 0"):
        module.main(module.Args(**TINY, runs_dir=str(tmp_path), num_seeds=0))
    assert not any(tmp_path.iterdir())
