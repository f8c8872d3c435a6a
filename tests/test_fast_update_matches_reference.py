"""iql.py's update (batched twin Q, fused Adam, foreach Polyak, one V forward for s and s')
computes the same thing as a straightforward CORL-style implementation, step for step."""

import numpy as np
import pytest
import torch

import iql
from benchmarks import reference_iql

OBS_DIM, ACT_DIM, HIDDEN, BATCH, STEPS = 11, 3, (32, 32), 64, 5


def random_batches(dtype):
    """Minibatches drawn from a small random dataset through iql.DeviceData, some steps terminal."""
    rng = np.random.default_rng(0)
    lengths = np.array([30, 50, 20])
    n = int(lengths.sum())
    terminations = np.zeros(n, bool)
    terminations[[29, 99]] = True  # two of the three episodes end in a termination, one is truncated
    truncations = np.zeros(n, bool)
    truncations[79] = True
    data = iql.OfflineData(
        observations=rng.standard_normal((n + len(lengths), OBS_DIM)).astype(np.float32),
        actions=rng.uniform(-0.99, 0.99, (n, ACT_DIM)).astype(np.float32),
        rewards=rng.standard_normal(n).astype(np.float32),
        terminations=terminations,
        truncations=truncations,
        episode_lengths=lengths,
    )
    buffer = iql.DeviceData(data, data.rewards, data.actions, torch.device("cpu"), seeds=[0])
    batches = [buffer.sample(BATCH) for _ in range(STEPS)]
    assert any(b.masks.min() == 0 for b in batches)
    return [iql.Batch(*(t.to(dtype) for t in (b.obs, b.actions, b.rewards, b.next_obs, b.masks))) for b in batches]


@pytest.mark.parametrize(
    "dtype, rtol, atol", [(torch.float32, 1e-5, 1e-6), (torch.float64, 1e-10, 1e-12)], ids=["float32", "float64"]
)
def test_iql_update_matches_corl_style_reference(dtype, rtol, atol):
    # a temperature and rewards large enough that some AWR weights hit the exp_adv_max cap
    args = iql.Args(
        hidden_dims=HIDDEN,
        batch_size=BATCH,
        total_steps=STEPS,
        expectile=0.7,
        temperature=3.0,
        exp_adv_max=2.0,
        actor_dropout=0.0,
    )
    value, critic, target_critic, actors = (
        net.to(dtype) for net in iql.make_networks(OBS_DIM, ACT_DIM, args, [0], ["concurrent"])
    )
    actor = actors["concurrent"]
    with torch.no_grad():
        actor.log_std.copy_(torch.linspace(-0.5, 0.5, ACT_DIM))  # not all equal, so a mix-up of dims would show
    value_opt, critic_opt = iql.make_optimizer(value, args.value_lr), iql.make_optimizer(critic, args.critic_lr)
    actor_opt = iql.make_optimizer(actor, args.actor_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(actor_opt, T_max=args.total_steps)

    ref = reference_iql.ReferenceIQL(
        OBS_DIM,
        ACT_DIM,
        HIDDEN,
        total_steps=args.total_steps,
        lr=args.actor_lr,
        discount=args.discount,
        tau=args.tau,
        expectile=args.expectile,
        temperature=args.temperature,
        exp_adv_max=args.exp_adv_max,
    ).to(dtype)
    reference_iql.copy_from_iql(ref, value, critic, target_critic, actor)

    def check(name, got, expected):
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")

    def check_all():
        def params(linears):
            return [(m.weight, m.bias) for m in linears if isinstance(m, torch.nn.Linear)]

        check("value", reference_iql.member_layers(value, 0), params(ref.vf))
        for twin, ref_twin in ((critic, ref.qf), (target_critic, ref.q_target)):
            for k, q in enumerate((ref_twin.q1, ref_twin.q2)):
                check(f"critic {k}", reference_iql.member_layers(twin, k), params(q))
        check(
            "actor",
            reference_iql.member_layers(actor.trunk, 0) + reference_iql.member_layers(actor.mean, 0),
            params(ref.actor.net),
        )
        check("actor log_std", actor.log_std[0, 0], ref.actor.log_std)

    check_all()  # the copy itself
    capped = 0
    for step, batch in enumerate(random_batches(dtype)):
        metrics, adv = iql.update_value_and_critic(batch, value, critic, target_critic, value_opt, critic_opt, args)
        actor_metrics = iql.update_actor(batch, adv, actor, actor_opt, scheduler, args)
        capped += int((iql.awr_weights(adv, args.temperature, args.exp_adv_max) == args.exp_adv_max).sum())
        losses = ref.update(iql.Batch(*(t[0] for t in batch)))  # the reference has no seed axis
        check(f"value loss, step {step}", metrics[0], losses["value_loss"])
        check(f"critic loss, step {step}", metrics[1], losses["critic_loss"])
        check(f"actor loss, step {step}", actor_metrics[0], losses["actor_loss"])
        check_all()
        assert actor_opt.param_groups[0]["lr"] == pytest.approx(ref.actor_optimizer.param_groups[0]["lr"])
    assert capped > 0, "no AWR weight reached the cap: the clamp went untested"
    assert actor_opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine schedule ran to its end
    # the targets really moved (Polyak ran) yet stayed apart from the online critics
    assert not torch.equal(target_critic.weights[0], critic.weights[0])


def test_speed_benchmark_runs(tmp_path):
    """benchmarks/speed.py end to end at toy sizes, so the one-command benchmark keeps working."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    small = [
        "--threads",
        "1",
        "--num-seeds",
        "2",
        "--modes",
        "bf16",
        "--peak-seconds",
        "0.01",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--buffer-episodes",
        "3",
        "--dataset-episodes",
        "3",
        "--episode-steps",
        "20",
        "--eval-episodes",
        "1",
        "--cache-dir",
        str(tmp_path),
    ]
    result = subprocess.run(
        [sys.executable, os.path.join(repo, "benchmarks", "speed.py"), *small], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    for heading in ("### Update step", "### Dataset", "### Evaluation"):
        assert heading in result.stdout
    # a row per seed count and update kind, beside the reference
    rows = [
        line.split(" | ")[1:3]
        for line in result.stdout.splitlines()
        if line.startswith("| 1 | ") and ("iql.py" in line or "reference" in line)
    ]
    assert rows == [["1", "reference (CORL-style, eager fp32)"], ["2", "iql.py bf16"]]


def test_speed_benchmark_reports_a_failing_mode_and_measures_the_rest(monkeypatch):
    """A mode that breaks on some machine (a compiler missing, CUDA graphs refusing) costs its own row, not the table."""
    import torch

    from benchmarks import speed

    def make_iql_step(cfg, device, num_seeds=1, mode="eager"):
        if mode == "compile":
            raise RuntimeError("no compiler here\nsecond line")
        return real(cfg, device, num_seeds, mode)

    real = speed.make_iql_step
    monkeypatch.setattr(speed, "make_iql_step", make_iql_step)
    cfg = speed.parse_args(
        [
            "--threads",
            "1",
            "--num-seeds",
            "1",
            "--modes",
            "compile",
            "bf16",
            "--peak-seconds",
            "0.01",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--buffer-episodes",
            "3",
            "--episode-steps",
            "20",
        ]
    )
    table = speed.bench_updates(cfg, torch.device("cpu"))  # leaves torch at the first --threads, 1
    rows = {line.split(" | ")[2]: line.split(" | ")[3] for line in table.splitlines() if line.startswith("| 1 | ")}
    assert rows["iql.py compile"] == "failed"
    assert float(rows["iql.py bf16"].replace(",", "")) > 0
    assert "1 seed(s), compile failed: RuntimeError: no compiler here" in table
