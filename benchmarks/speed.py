"""How fast is iql.py? One command, CPU or GPU, printing Markdown tables.

    python benchmarks/speed.py                      # Hopper sizes on the CPU
    python benchmarks/speed.py --device cuda        # the same on the GPU
    python benchmarks/speed.py --steps 200 --dataset-episodes 20 --eval-episodes 2   # a quick smoke run

Measures
  1. updates/s of iql.py's training step (V + twin Q + Polyak + concurrent actor + cosine schedule,
     minibatches sampled from an `iql.DeviceData` on the device) for 1, 3 and 10 seeds in lockstep
     (--num-seeds), eager, compiled (--compile) and in bfloat16 (--bf16), at 1 and 2 CPU threads, next to a
     straightforward CORL-style implementation of the same math (benchmarks/reference_iql.py), with the
     matmul FLOPs per update and the fraction of this machine's measured matmul peak that this achieves;
  2. load + flatten time and peak RSS of a synthetic Minari dataset (Hopper-v5 spaces, random data),
     in a fresh subprocess so that nothing else counts towards the peak, and the on-device dataset
     memory against the raw float32 size of (s, a, r, s', terminal);
  3. the overhead of `iql.evaluate` over the simulator alone, stepping the same actions.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import iql  # noqa: E402
from benchmarks import processor, reference_iql  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, what --threads 0 stands for


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=1):
    """Wall time of fn() (run `repeats` times), with the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return time.perf_counter() - start


def versions(device) -> str:
    cpu = processor()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none used"
    import minari
    import mujoco

    load = os.getloadavg()[0]
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, gymnasium {gym.__version__}, "
        f"mujoco {mujoco.__version__}, minari {minari.__version__}\n\n"
        f"CPU: {cpu} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
        f"1-min load average {load:.2f} before this run"
        + (": other processes were using the CPU, so timings are contended" if load > 0.5 else "")
        + f"); GPU: {gpu}; device: {device}"
    )


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# ---------------------------------------------------------------------------------------------
# 1. Update throughput
# ---------------------------------------------------------------------------------------------
def matmul_flops(batch: int, dims, backward: bool) -> int:
    """Matmul FLOPs of one MLP on `batch` rows: forward 2*B*in*out per linear layer; backward adds the
    weight gradient (2*B*in*out) of every layer and the input gradient (2*B*in*out) of every layer but the
    first (the network input needs no gradient, and autograd skips it)."""
    layers = [2 * batch * i * o for i, o in zip(dims[:-1], dims[1:])]
    return sum(layers) + (2 * sum(layers) - layers[0] if backward else 0)


def update_flops(b, obs_dim, act_dim, hidden) -> int:
    """Matmul FLOPs of one IQL update (both implementations do exactly these matmuls).
    Not counted: biases, activations, losses, Adam, Polyak, sampling (all O(parameters) or O(B * width))."""
    q_dims, v_dims, pi_dims = [obs_dim + act_dim, *hidden, 1], [obs_dim, *hidden, 1], [obs_dim, *hidden, act_dim]
    return (
        2 * matmul_flops(b, q_dims, backward=False)  # target twins on (s, a), for V's target and the advantage
        + matmul_flops(b, v_dims, backward=True)  # V(s), with its gradient
        + matmul_flops(2 * b, v_dims, backward=False)  # updated V on s and s'
        + 2 * matmul_flops(b, q_dims, backward=True)  # online twins, with gradients
        + matmul_flops(b, pi_dims, backward=True)  # actor mean, with its gradient
    )


def random_buffer(n_episodes, episode_len, obs_dim, act_dim, device, seed=0, seeds=(0,)) -> iql.DeviceData:
    rng = np.random.default_rng(seed)
    lengths = np.full(n_episodes, episode_len)
    n = int(lengths.sum())
    data = iql.OfflineData(
        observations=rng.standard_normal((n + n_episodes, obs_dim), dtype=np.float32),
        actions=rng.uniform(-0.99, 0.99, (n, act_dim)).astype(np.float32),
        rewards=rng.standard_normal(n, dtype=np.float32),
        terminations=rng.random(n) < 0.001,
        truncations=np.zeros(n, bool),
        episode_lengths=lengths,
    )
    return iql.DeviceData(data, data.rewards, data.actions, device, list(seeds))


def make_iql_step(cfg, device, num_seeds=1, mode="eager"):
    """iql.py's training step as its main loop runs it (concurrent actor), for num_seeds seeds in lockstep;
    mode: eager, compile (--compile), bf16 (--bf16) or compile+bf16."""
    args = iql.resolve_paper_settings(iql.Args(hidden_dims=tuple(cfg.hidden), batch_size=cfg.batch, total_steps=1_000_000))[0]
    buffer = random_buffer(
        cfg.buffer_episodes, cfg.episode_steps, cfg.obs_dim, cfg.act_dim, device, seeds=list(range(num_seeds))
    )
    value, critic, target_critic, actors = (
        net.to(device) for net in iql.make_networks(cfg.obs_dim, cfg.act_dim, args, list(range(num_seeds)), ["concurrent"])
    )
    actor = actors["concurrent"]
    value_opt, critic_opt = iql.make_optimizer(value, args.value_lr), iql.make_optimizer(critic, args.critic_lr)
    actor_opt = iql.make_optimizer(actor, args.actor_lr, tensor_lr="compile" in mode)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(actor_opt, T_max=args.total_steps)
    compile_mode = "reduce-overhead" if device.type == "cuda" else None  # as iql.py chooses
    update_vq, update_pi = (
        torch.compile(f, mode=compile_mode) if "compile" in mode else f
        for f in (iql.update_value_and_critic, iql.update_actor)
    )

    def step():
        batch = buffer.sample(args.batch_size)
        with torch.autocast(device.type, torch.bfloat16, enabled="bf16" in mode):
            metrics, adv = (
                t.clone() if "compile" in mode else t
                for t in update_vq(batch, value, critic, target_critic, value_opt, critic_opt, args)
            )  # as iql.py
            return torch.cat([metrics, update_pi(batch, adv, actor, actor_opt, scheduler, args)])

    return step, (value, critic, target_critic, actor)


def make_reference_step(cfg, device, nets):
    buffer = random_buffer(cfg.buffer_episodes, cfg.episode_steps, cfg.obs_dim, cfg.act_dim, device)
    ref = reference_iql.ReferenceIQL(cfg.obs_dim, cfg.act_dim, tuple(cfg.hidden), total_steps=1_000_000, device=device)
    reference_iql.copy_from_iql(ref, *nets)
    return lambda: ref.update(iql.Batch(*(t[0] for t in buffer.sample(cfg.batch))))  # the reference has no seed axis


def matmul_throughput(n, device, dtype=torch.float32, seconds=1.0) -> float:
    """Measured GFLOP/s of an n x n x n torch.matmul in dtype."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)
    reps = 1
    while timed(lambda: torch.matmul(a, b, out=out), device, reps) < 0.1:
        reps *= 2
    reps = max(1, int(reps * seconds / 0.1))
    best = min(timed(lambda: torch.matmul(a, b, out=out), device, reps) for _ in range(3))
    return 2 * n**3 * reps / best / 1e9


def rate(step, device, steps, repeats) -> list:
    """updates/s of `repeats` timings of `steps` calls."""
    return [steps / timed(step, device, steps) for _ in range(repeats)]


def bench_updates(cfg, device) -> str:
    flops = update_flops(cfg.batch, cfg.obs_dim, cfg.act_dim, cfg.hidden)
    sizes = (256, 1024, 4096) if device.type == "cuda" else (256, 1024)
    rows, notes = [], []
    for threads in cfg.threads if device.type == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads or DEFAULT_THREADS)
        peaks = {
            dtype: max(matmul_throughput(n, device, dtype, cfg.peak_seconds) for n in sizes)
            for dtype in (torch.float32, torch.bfloat16)
        }
        base_step, nets = make_iql_step(cfg, device)
        ref_step = make_reference_step(cfg, device, nets)  # from the same initial weights
        timed(ref_step, device, cfg.warmup)
        ref = statistics.median(rate(ref_step, device, cfg.steps, cfg.repeats))
        rows.append(
            [
                torch.get_num_threads(),
                1,
                "reference (CORL-style, eager fp32)",
                f"{ref:,.0f}",
                f"{ref:,.0f}",
                "1.00x",
                f"{flops * ref / 1e9:,.1f}",
                f"{100 * flops * ref / 1e9 / peaks[torch.float32]:.0f}% (fp32)",
                f"{1e6 / ref / 60:.1f} min",
            ]
        )
        for n in cfg.num_seeds:
            for mode in cfg.modes:
                start = time.perf_counter()
                try:  # a mode that fails here is one row saying so, and the other rows are still measured
                    step = base_step if (n, mode) == (1, "eager") else make_iql_step(cfg, device, n, mode)[0]
                    timed(step, device, cfg.warmup)  # compiles, with --compile
                    warm_s = time.perf_counter() - start
                    r = statistics.median(rate(step, device, max(cfg.steps // n, 10), cfg.repeats))
                except Exception as e:
                    rows.append([torch.get_num_threads(), n, f"iql.py {mode}", "failed", "", "", "", "", ""])
                    notes.append(f"{torch.get_num_threads()} thread(s), {n} seed(s), {mode} failed: {iql.describe(e)}")
                    continue
                dtype = torch.bfloat16 if "bf16" in mode else torch.float32
                achieved = n * flops * r / 1e9
                rows.append(
                    [
                        torch.get_num_threads(),
                        n,
                        f"iql.py {mode}",
                        f"{r:,.0f}",
                        f"**{n * r:,.0f}**",
                        f"{r / ref:.2f}x",
                        f"{achieved:,.1f}",
                        f"{100 * achieved / peaks[dtype]:.0f}% ({'bf16' if dtype == torch.bfloat16 else 'fp32'})",
                        f"{1e6 / r / 60:.1f} min",
                    ]
                )
                if "compile" in mode:
                    notes.append(
                        f"{torch.get_num_threads()} thread(s), {n} seed(s), {mode}: "
                        f"{warm_s:.0f} s for the {cfg.warmup} warm-up updates, compiling included"
                    )
        notes.append(
            f"{torch.get_num_threads()} thread(s): measured matmul peak (n x n by n x n, best of n in {sizes}) "
            f"fp32 {peaks[torch.float32]:,.1f} GFLOP/s, bf16 {peaks[torch.bfloat16]:,.1f} GFLOP/s"
        )
    torch.set_num_threads(cfg.threads[0] or DEFAULT_THREADS)  # for the sections after this one
    return (
        f"### Update step (batch {cfg.batch} per seed, obs {cfg.obs_dim}, act {cfg.act_dim}, hidden {tuple(cfg.hidden)}; "
        f"{cfg.steps} timed updates / seeds x {cfg.repeats} repeats (median) after {cfg.warmup} warm-up updates)\n\n"
        + table(
            [
                "threads",
                "seeds",
                "update",
                "updates/s",
                "seed-updates/s",
                "vs reference",
                "matmul GFLOP/s",
                "of peak matmul",
                "1M updates take",
            ],
            rows,
        )
        + f"\n\nMatmul FLOPs per update and seed: {flops / 1e6:.1f} MFLOP. Counted: forward 2*B*in*out per linear layer; "
        f"backward = weight gradients of every layer + input gradients of every layer but the first; target twins on B rows, "
        f"V forward+backward on B and forward on 2B, twin Q forward+backward on B, actor forward+backward on B. Not counted: "
        f"biases, activations, losses, Adam, Polyak, sampling. seed-updates/s = updates/s x seeds.\n\n"
        + "\n".join(f"- {note}" for note in notes)
        + "\n"
    )


# ---------------------------------------------------------------------------------------------
# 2. Dataset: load + flatten time, peak RSS, on-device memory
# ---------------------------------------------------------------------------------------------
def dataset_id(cfg) -> str:
    return f"bench/hopper/random-{cfg.dataset_episodes}x{cfg.episode_steps}-v0"


def build_dataset(cfg, store: str) -> float:
    """A synthetic dataset with Hopper-v5's spaces and dtypes, built once and cached in `store`."""
    if os.path.exists(os.path.join(store, dataset_id(cfg), "data", "metadata.json")):
        return 0.0
    import minari
    from minari.data_collector import EpisodeBuffer

    old, os.environ["MINARI_DATASETS_PATH"] = os.environ.get("MINARI_DATASETS_PATH"), store
    start = time.perf_counter()
    env = gym.make("Hopper-v5")
    rng = np.random.default_rng(0)
    T = cfg.episode_steps
    episodes = [
        EpisodeBuffer(
            id=e,
            observations=rng.standard_normal((T + 1, 11)),
            actions=rng.uniform(-1, 1, (T, 3)).astype(np.float32),
            rewards=rng.standard_normal(T),
            terminations=np.zeros(T, bool),
            truncations=np.arange(T) == T - 1,
            infos={},
        )
        for e in range(cfg.dataset_episodes)
    ]
    minari.create_dataset_from_buffers(
        dataset_id(cfg),
        episodes,
        env=env.spec,
        eval_env=env.spec,
        algorithm_name="random",
        author="benchmarks/speed.py",
        author_email="none@localhost",
        code_permalink="benchmarks/speed.py",
        description="random data with Hopper-v5 spaces",
    )
    if old is None:
        del os.environ["MINARI_DATASETS_PATH"]
    else:
        os.environ["MINARI_DATASETS_PATH"] = old
    return time.perf_counter() - start


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process image, from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak_rss() -> bool:
    """Make VmHWM the current RSS (Linux >= 4.0), so that the next peak belongs to the next stage alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def dataset_worker(cfg) -> dict:
    """Runs in a fresh subprocess: load + flatten + DeviceData, with the peak RSS of each stage.

    Peaks come from /proc/self/status (VmHWM, reset between stages), not from getrusage's ru_maxrss:
    on Linux ru_maxrss carries the parent's high-water mark over fork + exec, so in a subprocess of
    this (large) benchmark it would report the parent's memory. ru_maxrss is still shown, as a check.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # CUDA context first, so that it does not count as data
    result = {"rss_imports_mib": rss_mib("VmRSS"), "peak_reset": reset_peak_rss()}
    start = time.perf_counter()
    dataset = iql.load_minari_dataset(dataset_id(cfg))
    result["load_s"] = time.perf_counter() - start
    data = iql.flatten_dataset(dataset)
    result["load_flatten_s"] = time.perf_counter() - start
    result["peak_load_flatten_mib"], result["rss_after_flatten_mib"] = rss_mib("VmHWM"), rss_mib("VmRSS")
    reset_peak_rss()
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    buffer = iql.DeviceData(data, data.rewards, data.actions, device, [0])
    sync(device)
    result["device_data_s"] = time.perf_counter() - start
    result["peak_device_data_mib"], result["rss_after_device_data_mib"] = rss_mib("VmHWM"), rss_mib("VmRSS")
    result["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    tensors = [buffer.observations, buffer.obs_rows, buffer.actions, buffer.rewards, buffer.masks]
    result["device_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    if device.type == "cuda":
        result["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device) - base
    n, obs_dim, act_dim = len(data.rewards), data.observations.shape[1], data.actions.shape[1]
    result["raw_float32_bytes"] = 4 * n * (2 * obs_dim + act_dim + 1 + 1)  # s, s', a, r, terminal
    result["flat_bytes"] = sum(
        x.nbytes for x in (data.observations, data.actions, data.rewards, data.terminations, data.truncations)
    )
    result.update(transitions=n, episodes=len(data.episode_lengths), obs_dim=obs_dim, act_dim=act_dim)
    return result


def bench_dataset(cfg) -> str:
    store = os.path.abspath(os.path.join(cfg.cache_dir, "minari"))
    built = build_dataset(cfg, store)
    env = {**os.environ, "MINARI_DATASETS_PATH": store, "HF_HUB_OFFLINE": "1"}
    flags = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in (
            ("device", cfg.device),
            ("dataset_episodes", cfg.dataset_episodes),
            ("episode_steps", cfg.episode_steps),
            ("threads", cfg.threads[0]),
        )
    ]
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--dataset-worker", *flags],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])

    def mib(b):
        return f"{b / 2**20:,.1f} MiB"

    peak_note = "" if r["peak_reset"] else " (peak could not be reset: includes imports)"
    rows = [
        ["transitions / episodes", f"{r['transitions']:,} / {r['episodes']:,}"],
        ["dataset build (once, then cached)", f"{built:.1f} s" if built else "cached"],
        ["minari.load_dataset (iql.load_minari_dataset)", f"{r['load_s']:.2f} s"],
        ["load + iql.flatten_dataset", f"{r['load_flatten_s']:.2f} s"],
        ["RSS after imports", f"{r['rss_imports_mib']:,.0f} MiB"],
        [
            "peak RSS during load + flatten" + peak_note,
            f"{r['peak_load_flatten_mib']:,.0f} MiB "
            f"(+{r['peak_load_flatten_mib'] - r['rss_imports_mib']:,.0f} MiB over imports)",
        ],
        ["RSS after load + flatten", f"{r['rss_after_flatten_mib']:,.0f} MiB (flattened arrays: {mib(r['flat_bytes'])})"],
        [
            f"iql.DeviceData on {cfg.device}",
            f"{mib(r['device_bytes'])} of tensors, built in {r['device_data_s']:.2f} s; "
            f"peak RSS {r['peak_device_data_mib']:,.0f} MiB",
        ],
        *([["CUDA memory allocated by DeviceData", mib(r["cuda_allocated_bytes"])]] if "cuda_allocated_bytes" in r else []),
        ["raw float32 s, a, r, s', terminal", mib(r["raw_float32_bytes"])],
        ["DeviceData / raw float32", f"{r['device_bytes'] / r['raw_float32_bytes']:.2f}"],
        [
            "getrusage ru_maxrss of the subprocess (includes the parent's peak, see docstring)",
            f"{r['ru_maxrss_mib']:,.0f} MiB",
        ],
    ]
    return (
        f"### Dataset ({dataset_id(cfg)}: Hopper-v5 spaces, random data, measured in a fresh subprocess)\n\n"
        + table(["what", "measured"], rows)
        + "\n\nDeviceData holds each episode's T+1 observations once (s' is the next row) plus an int64 row index "
        "per transition, float32 actions/rewards and a float32 mask; on the CPU it shares the flattened numpy arrays.\n"
    )


# ---------------------------------------------------------------------------------------------
# 3. Evaluation overhead
# ---------------------------------------------------------------------------------------------
class RecordActions(gym.Wrapper):
    """Keeps every action stepped; wraps both the evaluated and the replayed envs, so it costs both the same."""

    def __init__(self, env, log):
        super().__init__(env)
        self.log = log

    def step(self, action):
        self.log.append(action)
        return self.env.step(action)


def bench_evaluation(cfg, device) -> str:
    torch.manual_seed(0)
    env_kwargs = {} if cfg.eval_terminate else {"terminate_when_unhealthy": False}  # every episode the full 1000 steps
    probe = gym.make("Hopper-v5", **env_kwargs)
    low, high = iql.action_bounds(probe.action_space)
    actor = iql.Actor(probe.observation_space.shape[0], probe.action_space.shape[0], tuple(cfg.hidden), 0.0, False).to(device)
    rows = []
    for k in cfg.eval_episodes:
        logs = []

        def make_env():
            logs.append([])
            return RecordActions(gym.make("Hopper-v5", **env_kwargs), logs[-1])

        envs = [[make_env() for _ in range(k)]]  # built before the clock starts, as iql.py builds them once per run
        start = time.perf_counter()
        returns = iql.evaluate(actor, envs, [cfg.seed], probe.observation_space, low, high, device)[0][0]  # seed 0's
        eval_s = time.perf_counter() - start
        steps = sum(len(log) for log in logs)

        # The simulator alone: the same envs, seeds and actions, no policy, no batching.
        replay_logs, replay_returns = [[] for _ in logs], np.zeros(k)
        replay_envs = [RecordActions(gym.make("Hopper-v5", **env_kwargs), log) for log in replay_logs]
        start = time.perf_counter()
        for i, (actions, env) in enumerate(zip(logs, replay_envs)):
            env.reset(seed=cfg.seed + i)
            for action in actions:
                replay_returns[i] += env.step(action)[1]
            env.close()
        sim_s = time.perf_counter() - start
        assert np.allclose(returns, replay_returns), "the replay did not reproduce the evaluation"
        overhead = eval_s - sim_s
        rows.append(
            [
                k,
                f"{steps:,}",
                f"{eval_s:.2f} s",
                f"{sim_s:.2f} s",
                f"{steps / sim_s:,.0f}",
                f"{overhead:.2f} s ({100 * overhead / sim_s:.0f}% of sim)",
                f"{1e6 * overhead / steps:.0f} us",
            ]
        )
    termination = (
        "default termination"
        if cfg.eval_terminate
        else "terminate_when_unhealthy=False so that every episode runs the full 1000 steps"
    )
    return (
        f"### Evaluation (iql.evaluate, Hopper-v5, {termination}, "
        f"randomly initialised actor on {device})\n\n"
        + table(
            [
                "episodes",
                "env steps",
                "iql.evaluate",
                "simulator alone (same actions)",
                "sim steps/s",
                "overhead",
                "overhead per env step",
            ],
            rows,
        )
        + "\n\nBoth timings include resetting the environments, not creating them: a run builds them once.\n"
    )


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch intra-op threads of each CPU update timing (0: torch's default); the first for the rest",
    )
    p.add_argument(
        "--num-seeds", type=int, nargs="+", default=[1, 3, 10], help="seeds trained in lockstep (--num-seeds), one timing each"
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=["eager", "compile", "bf16"],
        choices=["eager", "compile", "bf16", "compile+bf16"],
        help="iql.py's update as run plainly, with --compile, --bf16",
    )
    p.add_argument("--steps", type=int, default=1000, help="timed updates per repeat and implementation")
    p.add_argument("--warmup", type=int, default=100, help="untimed updates first")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats; the median is reported")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="timing of each matmul-peak measurement")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--obs-dim", type=int, default=11)
    p.add_argument("--act-dim", type=int, default=3)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument(
        "--buffer-episodes", type=int, default=1000, help="episodes of the random DeviceData the updates sample from"
    )
    p.add_argument("--dataset-episodes", type=int, default=1000, help="episodes of the synthetic Minari dataset")
    p.add_argument("--episode-steps", type=int, default=1000, help="steps per episode of both datasets")
    p.add_argument("--eval-episodes", type=int, nargs="+", default=[10], help="one evaluation timing per value")
    p.add_argument("--eval-terminate", action="store_true", help="let Hopper terminate when unhealthy (short episodes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache-dir", default=os.path.join(REPO, "logs", "speed_cache"), help="where the synthetic dataset is kept"
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["updates", "dataset", "eval"])
    p.add_argument("--dataset-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(cfg) -> None:
    torch.set_num_threads(cfg.threads[0] or DEFAULT_THREADS)
    if cfg.dataset_worker:
        print(json.dumps(dataset_worker(cfg)))
        return
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    print(
        f"## iql.py speed\n\n`{' '.join(['python', 'benchmarks/speed.py', *sys.argv[1:]])}`\n\n{versions(device)}\n",
        flush=True,
    )
    sections = [
        ("updates", lambda: bench_updates(cfg, device)),
        ("dataset", lambda: bench_dataset(cfg)),
        ("eval", lambda: bench_evaluation(cfg, device)),
    ]
    for name, run in sections:
        if name not in cfg.skip:
            start = time.perf_counter()
            print(run(), flush=True)
            print(f"({name}: {time.perf_counter() - start:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main(parse_args())
