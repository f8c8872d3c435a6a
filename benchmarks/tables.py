"""Turn the runs' summary.json files into the Markdown tables of benchmarks.md, and draw learning curves.

    python benchmarks/tables.py --runs-dir logs/bench_runs logs/toy_runs --write benchmarks.md --curves benchmarks/curves
    python benchmarks/tables.py --runs-dir logs/hopper_300k   # and IQL's V and advantages (older runs: --train-logs LOG)
    # and where IQL's AWR weights, and each method's score, fall in the dataset
    python benchmarks/tables.py --runs-dir logs/hopper_300k --awr-weights --returns
    python benchmarks/tables.py --runs-dir logs/hopper_300k --train-logs logs/hopper_300k.log --awr-weights --returns \
        --archive benchmarks/results

The score of a run is its final evaluation (the last one, as CORL's "last" column; never the best of
several); a cell is the mean +- std of that score over seeds, with the number of seeds. Runs of
different step budgets are never pooled: there is one score table, and one curve per dataset, for
each budget. --late adds, per budget, a table of each seed's mean over its evaluations from half the
budget on, the final one included (TD3+BC, Fujimoto & Gu 2021, reports the mean of its last 10
evaluations), which one checkpoint's luck moves less. --v-settling adds a table of where each IQL run's mean
V stops moving (settling), the measure by which a budget long enough for V to converge is chosen. Runs on
the local datasets that stand for the nine MuJoCo rows of the IQL paper's Table 1 also get those rows in
the blog post's shape, beside the paper's and the blog post's numbers. --wall-time adds the hours each dataset's
runs of each method took. The tables replace the text between
`<!-- BLOCK:start -->` and `<!-- BLOCK:end -->` of --write (--block, default `tables`), so that runs
of another kind can fill a block of their own.

IQL's curves of V, advantages and AWR weights come from the metrics.jsonl that iql.py writes into each run folder; runs
from before it wrote one are read from the progress lines they printed, in the logs named by --train-logs.

--archive DIR copies each finished run's small files (args, summary, evaluations) into DIR/{runs folder's name}/, with
what its tables and figures would otherwise read from elsewhere: its training curves (training.json, from its
metrics.jsonl or the logs), its AWR-weight statistics from its final networks, its dataset's record, fingerprint and
episode returns. The tables are then made
from the archive alone, so that results outlive the runs' folders, logs, checkpoints and datasets (DIR is committed,
they are not). A run archived earlier keeps what it had; a dataset rebuilt with other contents is refused.
--archived NAME ... makes the tables from those runs folders of DIR only, so that each block holds its own grids.
"""

import argparse
import collections
import functools
import glob
import json
import os
import shutil
import sys
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bc  # noqa: E402  (the scripts at the repository root)
import iql  # noqa: E402
from benchmarks import datasets_record  # noqa: E402

COLUMNS = ["BC", "10% BC", "10% BC by episodes", "IQL", "IQL post-hoc"]
# BC, 10% BC and IQL on D4RL's datasets: the IQL paper's Table 1 (Kostrikov et al. 2021), then the "mine" columns of Declan
# Oller's blog post reproducing IQL (<https://declanoller.github.io/iql_1>); the order is the blog post's table's
PUBLISHED = {
    "halfcheetah/medium": ((42.6, 42.5, 47.4), (42.4, 42.9, 46.6)),
    "hopper/medium": ((52.9, 56.9, 66.3), (46.6, 47.4, 54.2)),
    "walker2d/medium": ((75.3, 75.0, 78.3), (73.7, 75.2, 66.8)),
    "halfcheetah/medium-replay": ((36.6, 40.6, 44.2), (35.5, 40.3, 43.1)),
    "hopper/medium-replay": ((18.1, 75.9, 94.7), (11.6, 63.8, 29.0)),
    "walker2d/medium-replay": ((26.0, 62.5, 73.9), (11.8, 47.6, 62.6)),
    "halfcheetah/medium-expert": ((55.2, 92.9, 86.7), (48.5, 88.9, 81.1)),
    "hopper/medium-expert": ((52.5, 110.9, 91.5), (46.2, 86.9, 65.5)),
    "walker2d/medium-expert": ((107.5, 109.0, 109.6), (96.6, 98.1, 106.0)),
}


def commit_file(run_dir: str) -> Optional[str]:
    """run_grid.py writes commit.txt beside its runs; an archived run keeps a copy of its own."""
    return next(
        (p for p in (os.path.join(d, "commit.txt") for d in (run_dir, os.path.dirname(run_dir))) if os.path.exists(p)), None
    )


def load_runs(runs_dirs: list) -> list:
    runs = []
    for path in sorted(p for runs_dir in runs_dirs for p in glob.glob(os.path.join(runs_dir, "*", "summary.json"))):
        run_dir = os.path.dirname(path)
        summary = json.load(open(path))
        args = json.load(open(os.path.join(run_dir, "args.json")))
        if args.get("online_steps"):  # a fine-tuned policy is not an offline result; benchmarks.md reports those apart
            print(f"tables.py: {run_dir} was fine-tuned online (--online-steps); left out of the tables", file=sys.stderr)
            continue
        commit = commit_file(run_dir)
        run = {
            "dir": run_dir,
            "summary": summary,
            "args": args,
            "commit": open(commit).read().strip()[:12] if commit else None,
        }
        evaluations = os.path.join(run_dir, "evaluations.jsonl")  # read once for the late scores and the learning curves
        run["evaluations"] = [json.loads(line) for line in open(evaluations)] if os.path.exists(evaluations) else []
        for key, name in (("training", "training.json"), ("awr", "awr_weights.json")):  # written by --archive
            if os.path.exists(os.path.join(run_dir, name)):
                run[key] = json.load(open(os.path.join(run_dir, name)))
        runs.append(run)
    return runs


def label(run: dict, policy: str) -> str:
    return method(run, policy) + (" (bf16)" if run["args"].get("bf16") else "")  # --bf16 runs get columns of their own


def method(run: dict, policy: str) -> str:
    if policy == "bc":
        selection = run["summary"]["data_selection"]
        if selection["top_fraction"] == 1.0:
            return "BC"
        # runs made before the steps rule existed selected by episodes
        return f"{selection['top_fraction']:.0%} BC" + (
            " by episodes" if selection.get("top_by", "episodes") == "episodes" else ""
        )
    return {"concurrent": "IQL", "posthoc": "IQL post-hoc"}[policy]


def cell(values) -> str:
    return f"{mean_std(values)} ({len(values)})" if values else "–"


def budgets(runs: list) -> list:
    """The step budgets of the scored (non-toy) runs, smallest first."""
    return sorted({run["args"]["total_steps"] for run in runs if not run["summary"]["env_id"].startswith("toy/")})


def late_score(run: dict, policy: str, result: dict, steps: int) -> Optional[float]:
    """The mean of a seed's evaluations from half the budget on, the final one included, each checkpoint counted once."""
    seed = result.get("seed", run["args"]["seed"])
    late = [
        h["score_mean"]
        for h in run["evaluations"]
        if h["policy"] == policy and h.get("seed", seed) == seed and h["step"] >= steps / 2
    ]
    return float(np.mean(late)) if late and None not in late else None


def final_scores(runs: list, steps: int, late: bool = False) -> tuple:
    """{(dataset, column): each seed's final score (with late: late_score)} of the scored runs of one step budget, and
    {commit: the datasets of its runs}."""
    scores, commits = collections.defaultdict(list), collections.defaultdict(set)
    for run in runs:
        if run["summary"]["env_id"].startswith("toy/") or run["args"]["total_steps"] != steps:
            continue
        commits[run["commit"] or "not recorded"].add(run["summary"]["env_id"])
        for policy, result in run["summary"]["policies"].items():
            for seed in result.get("seeds", [result]):  # a run of several seeds (--num-seeds) keeps each seed's result
                score = late_score(run, policy, seed, steps) if late else seed["score_mean"]
                if score is not None:
                    scores[run["summary"]["env_id"], label(run, policy)].append(score)
    return scores, commits


def score_table(runs: list, steps: int, late: bool = False) -> str:
    """Datasets x methods at one step budget: mean +- std over seeds of the final score (with late: of late_score), and the
    average row."""
    scores, commits = final_scores(runs, steps, late)
    datasets = sorted({d for d, _ in scores})
    if not datasets:
        return "no scored runs"
    columns = [c for c in COLUMNS + [f"{c} (bf16)" for c in COLUMNS] if any((d, c) in scores for d in datasets)]
    lines = ["| dataset | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for d in datasets:
        lines.append(f"| {d} | " + " | ".join(cell(scores.get((d, c), [])) for c in columns) + " |")
    complete = [d for d in datasets if all((d, c) in scores for c in columns)]
    if complete:
        averages = [np.mean([np.mean(scores[d, c]) for d in complete]) for c in columns]
        lines.append(
            f"| **average** ({len(complete)} dataset{'s' if len(complete) > 1 else ''}) | "
            + " | ".join(f"**{a:.1f}**" for a in averages)
            + " |"
        )
    return "\n".join(lines) + "\n\n" + code_line(commits)


def code_line(commits: dict) -> str:
    """The commit under a table; each commit's datasets beside it when the table's runs come from more than one."""
    if len(commits) == 1:
        return f"Code: commit {next(iter(commits))}."
    return "Code: " + "; ".join(f"commit {c} ({', '.join(sorted(commits[c]))})" for c in sorted(commits)) + "."


def published_table(runs: list, steps: int, records: dict) -> Optional[str]:
    """The nine locomotion rows of the IQL paper's Table 1 in the shape of the blog post's table: per dataset, its
    episodes' mean return on the score scale (records: benchmarks/datasets.py's), BC, 10% BC and IQL (the post-hoc actor
    beside it) of the local datasets' runs at one budget (mean +- std over seeds), then the paper's and the blog post's
    numbers. None when no run at that budget is on one of the nine."""
    scores, commits = final_scores(runs, steps)
    if not any(f"local/{name}-v0" == d for name in PUBLISHED for d, _ in scores):
        return None
    lines = [
        "| dataset | data | BC | 10% BC | IQL (post-hoc) | paper: BC | 10% BC | IQL | blog: BC | 10% BC | IQL |",
        "|---" * 11 + "|",
    ]
    for name, published in PUBLISHED.items():
        dataset_id = f"local/{name}-v0"
        record = records.get(dataset_id)
        ours = [normalised_mean(record) if record else "–"]
        ours += [mean_std(scores.get((dataset_id, c))) for c in ("BC", "10% BC", "IQL")]
        posthoc = scores.get((dataset_id, "IQL post-hoc"))
        ours[3] += f" ({mean_std(posthoc)})" if posthoc else ""
        numbers = " | ".join(f"{x:.1f}" for row in published for x in row)
        robot, dataset = name.split("/")
        lines.append(f"| {robot} `{dataset}` | {' | '.join(ours)} | {numbers} |")
    return "\n".join(lines) + "\n\n" + code_line(commits)


def mean_std(values) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else "–"


def normalised_mean(record: dict) -> str:
    """A dataset's mean episode return on the score scale of its reference returns; "–" for a dataset without them."""
    if record["ref_max_score"] is None:
        return "–"
    return (
        f"{100 * (record['return_mean'] - record['ref_min_score']) / (record['ref_max_score'] - record['ref_min_score']):.1f}"
    )


def read_records(record_path: str) -> dict:
    """{dataset id: its record} from benchmarks/datasets.py's local_datasets.jsonl (the last of a dataset built more than
    once)."""
    return {r["dataset_id"]: r for r in map(json.loads, open(record_path))} if os.path.exists(record_path) else {}


def datasets_table(records: dict, dataset_ids: set) -> str:
    """Size, return distribution, reference returns and behaviour policies of the runs' datasets, as
    benchmarks/datasets.py recorded them."""
    records = {d: r for d, r in records.items() if d in dataset_ids}
    lines = [
        "| dataset | episodes | steps | episode return: mean (quartiles; min, max) | normalised mean "
        "| reference returns (score 0, 100) | behaviour policies (mean return of the checkpoint's deterministic evaluation) "
        "| SHA-256 of the data (first 12 digits) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def number(x):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"

    for r in sorted(records.values(), key=lambda r: r["dataset_id"]):
        scored = r["ref_max_score"] is not None
        refs = f"{r['ref_min_score']:.1f}, {r['ref_max_score']:.1f}" if scored else "–"
        quartiles = ", ".join(number(q) for q in r["return_quartiles"])
        behaviour = r.get("behaviour")
        policies = (
            "; ".join(
                f"{tag}: SAC at step {behaviour[f'{tag}_policy']['step']:,} ({behaviour[f'{tag}_policy']['return_mean']:.1f})"
                for tag in ("medium", "expert")
            )
            if behaviour
            else "–"
        )
        lines.append(
            f"| {r['dataset_id']} | {r['episodes']:,} | {r['steps']:,} "
            f"| {number(r['return_mean'])} ({quartiles}; {number(r['return_min'])}, {number(r['return_max'])}) "
            f"| {normalised_mean(r)} | {refs} | {policies} | {r.get('sha256', '–')[:12]} |"
        )
    return "\n".join(lines)


def analytic_v_s1(up_fraction: float, expectile: float) -> float:
    """argmin_v p tau (10 - v)^2 + (1 - p)(1 - tau)(-10 - v)^2, the blog's arithmetic."""
    w_up, w_down = up_fraction * expectile, (1 - up_fraction) * (1 - expectile)
    return (10 * w_up - 10 * w_down) / (w_up + w_down)


def toy_table(runs: list) -> Optional[str]:
    """Two-step MDP: expectile vs the learned and analytic V(s1), and the return of the policy; None without toy runs."""
    rows = collections.defaultdict(lambda: {"v": [], "ret": []})
    fractions = {}
    for run in runs:
        env_id, args = run["summary"]["env_id"], run["args"]
        if not env_id.startswith("toy/twostep/") or "concurrent" not in run["summary"]["policies"]:
            continue
        checkpoint = os.path.join(run["dir"], "model.pt")
        if not os.path.exists(checkpoint):
            continue
        value = iql.Ensemble(3, tuple(args["hidden_dims"]), 1, members=args.get("num_seeds", 1))
        value.load_state_dict(torch.load(checkpoint, weights_only=True)["networks"]["value"])
        with torch.no_grad():
            v_s1 = value(torch.eye(3)[None, 1:2]).flatten().tolist()  # one per seed
        key = (env_id, args["expectile"], "bf16" if args.get("bf16") else "fp32")
        rows[key]["v"] += v_s1
        result = run["summary"]["policies"]["concurrent"]
        rows[key]["ret"] += [r["return_mean"] for r in result.get("seeds", [result])]
        fractions[env_id] = 0.1 if "ten" in env_id else 0.5
    if not rows:
        return None
    precisions = sorted({p for _, _, p in rows}, reverse=True)  # fp32 first; bf16 (--bf16) beside it when there are such runs
    lines = [
        "| dataset | expectile | V(s1) analytic | "
        + " | ".join(f"V(s1) learned, {p}" for p in precisions)
        + " | "
        + " | ".join(f"return of the policy, {p} (best: 10)" for p in precisions)
        + " |",
        "|---" * (3 + 2 * len(precisions)) + "|",
    ]
    for env_id, expectile in sorted({(d, e) for d, e, _ in rows}):
        found = [rows.get((env_id, expectile, p)) for p in precisions]
        lines.append(
            f"| {env_id} | {expectile} | {analytic_v_s1(fractions[env_id], expectile):.2f} | "
            + " | ".join(f"{np.mean(r['v']):.2f} ± {np.std(r['v']):.2f}" if r else "–" for r in found)
            + " | "
            + " | ".join(f"{np.mean(r['ret']):.1f} ({len(r['ret'])} seeds)" if r else "–" for r in found)
            + " |"
        )
    return "\n".join(lines)


def plot_band(ax, steps: list, values: np.ndarray, name: str, over: str) -> None:
    """The mean of values' rows (one per seed, or per run) against steps, in a band of +-1 std (the legend's title says so)."""
    mean, std = values.mean(0), values.std(0)
    ax.plot(steps, mean, label=f"{name} ({len(values)} {over if len(values) > 1 else over[:-1]})")
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2)


def save_figure(fig, out_dir: str, dataset: str, budget: int, suffix: str = "") -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out_dir, f"{dataset.replace('/', '__')}__{budget}{suffix}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def learning_curves(runs: list, out_dir: str) -> list:
    """One PNG per dataset and step budget: score against gradient step, mean with a +-std band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = collections.defaultdict(lambda: collections.defaultdict(list))  # dataset -> label -> [(steps, scores)]
    for run in runs:
        history = run["evaluations"]
        if run["summary"]["env_id"].startswith("toy/") or not history:
            continue
        for policy in run["summary"]["policies"]:
            for seed in sorted(
                {h.get("seed") for h in history}, key=str
            ):  # one curve per seed; runs of one seed may predate the field
                points = [
                    (h["step"], h["score_mean"])
                    for h in history
                    if h["policy"] == policy and h.get("seed") == seed and h["score_mean"] is not None
                ]
                if points:
                    curves[run["summary"]["env_id"], run["args"]["total_steps"]][label(run, policy)].append(points)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (dataset, budget), by_label in sorted(curves.items()):
        fig, ax = plt.subplots(figsize=(8, 4))
        for name, seeds in sorted(by_label.items()):
            steps = sorted(set.intersection(*(set(s for s, _ in points) for points in seeds)))
            plot_band(ax, steps, np.array([[dict(points)[s] for s in steps] for points in seeds]), name, "seeds")
        ax.set_xlabel("policy updates (IQL post-hoc: its own, after the V/Q steps)")
        ax.set_ylabel("score")
        ax.set_title(f"{dataset}, {budget:,} steps")
        ax.legend(
            title="band: ± 1 std over seeds", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1)
        )  # outside: curves fill the axes
        written.append((f"{dataset}, {budget:,} steps", save_figure(fig, out_dir, dataset, budget)))
    return written


@functools.lru_cache(maxsize=None)
def dataset_arrays(dataset_id: str):
    """A dataset as iql.py flattens it, read once however many runs and tables use it."""
    return iql.flatten_dataset(iql.load_minari_dataset(dataset_id))


def return_figures(runs: list, out_dir: str, episode_returns) -> list:
    """One PNG per dataset and step budget: the dataset's episode returns as scores, and where each method's final
    evaluation lands among them (a line at the mean over seeds, a dot per seed). Datasets scored by return only;
    episode_returns(dataset id) gives a dataset's returns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = collections.defaultdict(lambda: collections.defaultdict(list))  # dataset and budget -> label -> seed scores
    for run in runs:
        if run["summary"]["scoring"]["kind"] == "return" and not run["summary"]["env_id"].startswith("toy/"):
            for policy, result in run["summary"]["policies"].items():
                groups[run["summary"]["env_id"], run["args"]["total_steps"]][label(run, policy)] += [
                    seed["score_mean"] for seed in result.get("seeds", [result])
                ]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (dataset, budget), by_label in sorted(groups.items()):
        rule = next(run["summary"]["scoring"] for run in runs if run["summary"]["env_id"] == dataset)
        returns = np.asarray(episode_returns(dataset))
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.hist(
            100 * (returns - rule["ref_min"]) / (rule["ref_max"] - rule["ref_min"]),
            bins=40,
            color="lightgray",
            label=f"the dataset's {len(returns)} episodes",
        )
        for i, (name, scores) in enumerate(sorted(by_label.items())):
            color = f"C{i}"
            ax.axvline(
                np.mean(scores),
                color=color,
                label=f"{name}: {np.mean(scores):.1f} "
                f"(mean over {len(scores)} seed{'s' if len(scores) > 1 else ''}; dots: each seed)",
            )
            ax.plot(scores, np.full(len(scores), ax.get_ylim()[1] * (0.95 - 0.05 * i)), "o", color=color)
        ax.set_xlabel("score (normalised return)")
        ax.set_ylabel("episodes")
        ax.set_title(f"{dataset}, {budget:,} steps: final scores among the episode returns")
        ax.legend(fontsize="small", loc="center left")
        written.append(
            (
                f"{dataset}, {budget:,} steps: final scores among the dataset's episode returns",
                save_figure(fig, out_dir, dataset, budget, "__returns"),
            )
        )
    return written


def started_run(flags: list, claimed: set) -> Optional[str]:
    """The run folder that a fresh `python iql.py --flag value ...` made: the first one not in claimed whose args.json holds
    every value named. A run stopped before its first checkpoint is started again by the same command into a new folder;
    folder names end in their start time, so the n-th start of the same command made the n-th of those folders."""
    named, flag = {}, None
    for word in flags:
        if word.startswith("--no-"):  # tyro's --no-flag turns a bool off
            flag = word[5:].replace("-", "_")
            named[flag] = [False]
        elif word.startswith("--"):
            flag = word[2:].replace("-", "_")
            named[flag] = []
        else:
            named[flag].append(word)
    runs_dir = named.pop("runs_dir")[0]

    def same(stored, given: list) -> bool:
        stored, given = (
            stored if isinstance(stored, list) else [stored],
            given or [True],
        )  # a flag without a value turns a bool on
        try:
            return len(stored) == len(given) and all(
                a is b if isinstance(b, bool) else str(a) == b or float(a) == float(b) for a, b in zip(stored, given)
            )
        except (TypeError, ValueError):
            return False

    for path in sorted(glob.glob(os.path.join(runs_dir, "*", "args.json"))):
        stored = json.load(open(path))
        if (
            os.path.dirname(path) not in claimed
            and "top_fraction" not in stored
            and all(same(stored.get(k), v) for k, v in named.items())
        ):
            return os.path.dirname(path)
    return None


def metrics_file(run_dir: str) -> dict:
    """{step: {metric: value}} of the V/Q phase ("train") from the metrics.jsonl iql.py writes into a run folder, each metric
    named as the `train step` lines name it (v_mean for charts/v_mean), so that a run's curves read the same from either.
    The speed, which those lines print outside their metrics, and the post-hoc actor's phase, which the logs' reader skips,
    are left out. A step written twice keeps its last record, as a resumed run's log does."""
    steps = {}
    for record in (json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()):
        if record["phase"] == "train":
            steps[int(record["step"])] = {
                k.split("/")[1]: float(v) for k, v in record.items() if "/" in k and k != "charts/updates_per_second"
            }
    return steps


def training_metrics(log_paths: list, runs_dirs: list = ()) -> dict:
    """{run folder: {step: {metric: value}}} of the IQL runs: from the metrics.jsonl of each finished IQL run in runs_dirs
    (metrics_file), and for runs from before iql.py wrote that file, from the `train step` lines iql.py prints, in the logs
    that run_grid.py's output went to; a step that both hold is taken from metrics.jsonl, which is not rounded. A run's lines
    follow the command that started or resumed it; a step logged again after a resume takes the later line, the one the
    finished run continued from. Two runs printing into one log at once cannot be told apart, so a step that does not
    follow on from the step before it is refused."""
    metrics, run_dir, claimed, last_step = collections.defaultdict(dict), None, set(), -1
    for path in log_paths:
        for line in open(path):
            words = line.split()
            if words[:1] == ["python"]:
                run_dir = (
                    None if words[1] != "iql.py" else words[3] if words[2] == "--resume" else started_run(words[2:], claimed)
                )
                claimed.add(run_dir)
                last_step = -1
            elif words[:2] == ["train", "step"] and run_dir:
                step, values = int(words[2].split("/")[0]), line.split("|")[-1].split()
                if step <= last_step:
                    sys.exit(
                        f"tables.py: {path}: train step {step} after step {last_step} of the same run: two runs printed into "
                        "this log at the same time; give each run_grid.py process a log of its own"
                    )
                metrics[os.path.abspath(run_dir)][step], last_step = (
                    {k: float(v) for k, v in zip(values[::2], values[1::2])},
                    step,
                )
    for path in sorted(p for runs_dir in runs_dirs for p in glob.glob(os.path.join(runs_dir, "*", "metrics.jsonl"))):
        run_dir = os.path.dirname(path)
        finished = os.path.exists(os.path.join(run_dir, "summary.json"))  # else it may be writing its last line
        if finished and "posthoc_steps" in json.load(open(os.path.join(run_dir, "args.json"))):  # BC runs have no V to draw
            metrics[os.path.abspath(run_dir)].update(metrics_file(run_dir))
    return metrics


def discounted_return_to_go(run: dict) -> float:
    """Mean over the dataset's steps of the discounted return that followed them, in the run's training reward:
    what V would be for the behaviour policy, ignoring what follows a time limit."""
    data = dataset_arrays(run["args"]["env_id"])
    scale, shift = iql.reward_transform(run["args"]["reward_normalization"], data.episode_returns)
    rewards, to_go = data.rewards * scale + shift, []
    for start, length in zip(data.episode_starts, data.episode_lengths):
        g, episode = 0.0, []
        for r in rewards[start : start + length][::-1]:
            g = r + run["args"]["discount"] * g
            episode.append(g)
        to_go += episode
    return float(np.mean(to_go))


def saved_mlp(state: dict) -> list:
    """The (weight (members, in, out), bias (members, 1, out)) layers of a checkpoint's MLP: iql.py's Ensemble (and the TwinQ
    before it) store them so; the value network of checkpoints from before Ensemble is an nn.Sequential of Linear layers."""
    if "weights.0" in state:
        return [(state[f"weights.{i}"], state[f"biases.{i}"]) for i in range(len(state) // 2)]
    linear = sorted({int(k.split(".")[0]) for k in state})
    return [(state[f"{i}.weight"].T[None], state[f"{i}.bias"][None, None]) for i in linear]


def mlp_output(layers: list, x: torch.Tensor) -> torch.Tensor:
    """(members, batch): each member's ReLU MLP on the same inputs (batch, in)."""
    x = x.expand(len(layers[0][0]), -1, -1)
    for i, (w, b) in enumerate(layers):
        x = torch.baddbmm(b, x, w)
        x = torch.relu(x) if i < len(layers) - 1 else x
    return x.squeeze(-1)


def saved_networks(run: dict) -> Optional[str]:
    """The file holding a finished run's final networks, as --eval-only picks it: model.pt, else the last checkpoint.pt."""
    return next(
        (p for p in (os.path.join(run["dir"], name) for name in ("model.pt", "checkpoint.pt")) if os.path.exists(p)), None
    )


def final_advantages(run: dict) -> tuple:
    """(the run's dataset, its checkpoint's args, advantages min Q_target(s, a) - V(s) of its final networks at every step of
    the dataset, (seeds, steps)), computed as iql.py's update does."""
    checkpoint = iql.load_checkpoint(saved_networks(run))
    args, bounds = checkpoint["args"], checkpoint["normalization"]
    data = dataset_arrays(args["env_id"])
    data = iql.cut_episodes_at_goal(data) if args["goal_terminal"] else data  # the steps the run trained on
    obs = torch.as_tensor(data.observations[data.obs_rows])
    actions = torch.as_tensor(
        iql.to_unit_box(data.actions, np.array(bounds["action_low"]), np.array(bounds["action_high"])), dtype=torch.float32
    )
    value, critic = saved_mlp(checkpoint["networks"]["value"]), saved_mlp(checkpoint["networks"]["target_critic"])
    with torch.no_grad():  # in chunks: a whole dataset's hidden activations would take gigabytes
        advantages = torch.cat(
            [
                mlp_output(critic, torch.cat([o, a], -1)).view(-1, 2, len(o)).min(1).values - mlp_output(value, o)
                for o, a in zip(obs.split(16384), actions.split(16384))
            ],
            dim=1,
        )
    return data, args, advantages.double().numpy()


def awr_weight_stats(data, advantages: np.ndarray, temperature: float, exp_adv_max: float) -> list:
    """For each seed's row of advantages: how the AWR weights exp(temperature * advantage), clipped at exp_adv_max, spread
    over the dataset's steps. top10_*: the episodes 10% BC trains on (bc.py's selection); fall_*: the last 50 steps of
    episodes that end in a termination; return_rank_corr: Spearman's correlation over episodes between return and mean
    advantage; ess: (sum w)^2 / (N sum w^2), the share of steps that would carry as much information as the weighted ones."""
    logits, clip = temperature * advantages, np.log(exp_adv_max)
    weights = np.exp(np.minimum(logits, clip))  # exp(logits) clipped at exp_adv_max, without overflow
    returns = data.episode_returns
    top = np.repeat(returns >= bc.top_episodes(data, 0.1, "steps")[1], data.episode_lengths)
    ends = data.episode_starts + data.episode_lengths  # one past each episode's last step
    to_end = np.repeat(ends, data.episode_lengths) - np.arange(len(data.rewards))
    before_fall = np.repeat(data.terminations[ends - 1], data.episode_lengths) & (to_end <= 50)

    def rank(x):
        return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)

    stats = []
    for adv, w, clipped in zip(advantages, weights, logits >= clip):
        episode_adv = np.add.reduceat(adv, data.episode_starts) / data.episode_lengths
        stats.append(
            {
                "top10_weight": w[top].sum() / w.sum(),
                "top10_steps": top.mean(),
                "fall_weight": w[before_fall].sum() / w.sum(),
                "fall_steps": before_fall.mean(),
                "return_rank_corr": np.corrcoef(rank(returns), rank(episode_adv))[0, 1],
                "ess": w.sum() ** 2 / (len(w) * np.square(w).sum()),
                "clipped": clipped.mean(),
            }
        )
    return stats


def awr_results(runs: list) -> dict:
    """{run folder: {"rows": {row: awr_weight_stats}, "pairs": {"row|row": r}}} for the IQL runs: a row is one seed's
    ("{run folder's name}:{index}"), r is Pearson's correlation over the steps between its advantages and those of each later
    row of the same dataset and budget. From the final networks of the runs that have them, else as --archive stored it."""
    results, live = {}, collections.defaultdict(list)  # dataset and budget -> [(run folder, row, advantages)]
    for run in runs:
        if "posthoc_steps" in run["args"] and saved_networks(run):
            data, args, advantages = final_advantages(run)
            rows = [f"{os.path.basename(run['dir'])}:{i}" for i in range(len(advantages))]
            results[run["dir"]] = {
                "rows": dict(zip(rows, awr_weight_stats(data, advantages, args["temperature"], args["exp_adv_max"]))),
                "pairs": {},
            }
            live[run["summary"]["env_id"], run["args"]["total_steps"]] += [
                (run["dir"], row, a) for row, a in zip(rows, advantages)
            ]
        elif "awr" in run:
            results[run["dir"]] = run["awr"]
    for members in live.values():
        for i, (run_dir, row, a) in enumerate(members):
            results[run_dir]["pairs"].update(
                {f"{row}|{other}": float(np.corrcoef(a, b)[0, 1]) for _, other, b in members[i + 1 :]}
            )
    return results


def awr_weight_table(runs: list) -> str:
    """Datasets x step budgets: awr_results' statistics, mean +- std over seeds; and how much of a step's advantage is the
    data's rather than one seed's networks': the correlation between two seeds' advantages, over every pair of seeds whose
    networks were on hand together."""
    groups = collections.defaultdict(lambda: ({}, {}))  # dataset and budget -> (stats by row, r by pair)
    for run_dir, result in awr_results(runs).items():
        run = next(r for r in runs if r["dir"] == run_dir)
        rows, pairs = groups[run["summary"]["env_id"], run["args"]["total_steps"]]
        rows.update(result["rows"])
        pairs.update({"|".join(sorted(pair.split("|"))): r for pair, r in result["pairs"].items()})
    lines = [
        "| dataset | steps | share of the AWR weight on the top-10% episodes (their share of steps) "
        "| on the 50 steps before a fall (their share) | rank correlation of episode return and mean advantage "
        "| effective sample size | weights at the clip | correlation of two seeds' advantages | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def spread(values, f):
        return f"{f(np.mean(values))} ± {f(np.std(values))}" if values else "–"

    def percent(x):
        return f"{100 * x:.1f}%"

    def plain(x):
        return f"{x:.2f}"

    for (dataset, steps), (rows, pairs) in sorted(groups.items()):
        stats, pairs = list(rows.values()), list(pairs.values())

        def column(key, f):
            return spread([s[key] for s in stats], f)

        lines.append(
            f"| {dataset} | {steps:,} | {column('top10_weight', percent)} ({percent(stats[0]['top10_steps'])}) "
            f"| {column('fall_weight', percent)} ({percent(stats[0]['fall_steps'])}) | {column('return_rank_corr', plain)} "
            f"| {column('ess', percent)} | {column('clipped', percent)} | {spread(pairs, plain)} | {len(stats)} |"
        )
    return (
        "\n".join(lines)
        if groups
        else "no IQL run with its final networks (model.pt or checkpoint.pt) or archived AWR statistics"
    )


def value_history(run: dict, metrics: dict) -> dict:
    """{step: {metric: value}} of an IQL run's V/Q phase: from training_metrics, else from its archived training.json."""
    return metrics.get(os.path.abspath(run["dir"])) or {
        int(step): m for step, m in run.get("training", {}).get("steps", {}).items()
    }


def settling(history: dict, window: int = 10_000, tolerances: tuple = (0.05, 0.02)) -> tuple:
    """Where IQL's V stops moving: the mean of the logged mean V (each logged step's minibatch) over each `window` gradient
    steps, the last window's mean, and per tolerance the first window's start from which every window's mean lies within
    that fraction of the last one's. None where only the last window does: V was still moving when the run ended."""
    blocks = collections.defaultdict(list)
    for step, logged in history.items():
        blocks[(step - 1) // window].append(logged["v_mean"])  # steps 1 to window are the first window
    starts = sorted(blocks)
    means = [np.mean(blocks[start]) for start in starts]
    settled = []
    for tolerance in tolerances:
        first = len(means) - 1
        while first > 0 and abs(means[first - 1] - means[-1]) <= tolerance * abs(means[-1]):
            first -= 1
        settled.append(starts[first] * window if first < len(means) - 1 else None)
    return means[-1], settled


def settling_table(runs: list, metrics: dict) -> str:
    """One row per IQL run with logged V: settling's last-window mean V and the steps from which V stays within 5% and 2%."""
    rows = [
        "| dataset | gradient steps | seeds | mean V, last 10,000 steps | within 5% of it from step | within 2% from step |",
        "|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda r: (r["summary"]["env_id"], r["args"]["total_steps"], r["args"]["seed"])):
        history = value_history(run, metrics)
        if not history:
            continue
        final, settled = settling(history)
        first, count = run["args"]["seed"], run["args"].get("num_seeds", 1)
        seeds = f"{first}" if count == 1 else f"{first}-{first + count - 1} (mean)"
        steps = " | ".join("–" if step is None else f"{step:,}" for step in settled)
        rows.append(f"| `{run['summary']['env_id']}` | {run['args']['total_steps']:,} | {seeds} | {final:.2f} | {steps} |")
    return "\n".join(rows)


def wall_time_table(runs: list) -> str:
    """Hours of wall time per dataset, step budget and method, summed over the method's runs, with their seeds: what each
    stage of a grid cost. summary.json's wall_time_s; a resumed run adds each stretch it ran, and an IQL run holds its
    post-hoc actor's steps when it has one."""
    hours, seeds = collections.defaultdict(float), collections.defaultdict(int)
    for run in runs:
        if run["summary"].get("wall_time_s") is None:  # runs made before summaries recorded it
            continue
        policy = next(iter(run["summary"]["policies"]))
        name = "IQL" if policy in ("concurrent", "posthoc") else method(run, policy)
        key = (run["summary"]["env_id"], run["args"]["total_steps"], name)
        hours[key] += run["summary"]["wall_time_s"] / 3600
        seeds[key] += run["args"].get("num_seeds", 1)
    columns = [c for c in COLUMNS if any(k[2] == c for k in hours)]
    rows = ["| dataset | gradient steps | " + " | ".join(columns) + " | all |", "|---" * (len(columns) + 3) + "|"]
    for dataset, steps in sorted({k[:2] for k in hours}):
        cells = [f"{hours[k]:.2f} ({seeds[k]})" if (k := (dataset, steps, c)) in hours else "–" for c in columns]
        total = sum(hours[dataset, steps, c] for c in columns if (dataset, steps, c) in hours)
        rows.append(f"| {dataset} | {steps:,} | " + " | ".join(cells) + f" | {total:.2f} |")
    return "\n".join(rows)


def training_curves(runs: list, metrics: dict, out_dir: str) -> list:
    """One PNG per dataset and step budget: IQL's mean V, mean advantage Q - V and mean AWR weight on the minibatch of each
    logged step against the gradient step, mean with a +-std band over runs (one per seed, or a --num-seeds run's mean over
    its seeds). A run's steps are those of training_metrics, else of its archived training.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "v_mean": "mean V(s)",
        "advantage_mean": "mean advantage Q(s, a) - V(s)",
        "awr_weight_mean": "mean AWR weight (clipped at exp_adv_max)",
    }
    groups = collections.defaultdict(lambda: collections.defaultdict(list))  # dataset and budget -> label -> runs
    history = functools.partial(value_history, metrics=metrics)
    for run in runs:
        if history(run):
            groups[run["summary"]["env_id"], run["args"]["total_steps"]][label(run, "concurrent")].append(run)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (dataset, budget), by_label in sorted(groups.items()):
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
        for ax, (key, title) in zip(axes, panels.items()):
            for name, group in sorted(by_label.items()):
                logged = [history(run) for run in group]
                # the steps every run logged; a post-hoc-only run logs no advantages while V and Q train
                steps = sorted(s for s in set.intersection(*(set(h) for h in logged)) if all(key in h[s] for h in logged))
                if not steps:
                    continue
                plot_band(ax, steps, np.array([[h[s][key] for s in steps] for h in logged]), name, "runs")
            if key == "v_mean":
                first = next(iter(by_label.values()))[0]
                reference = first["training"]["return_to_go"] if "training" in first else discounted_return_to_go(first)
                ax.axhline(reference, color="gray", linestyle="--", label="dataset's discounted return-to-go, mean over steps")
            ax.set_xlabel("gradient step")
            ax.set_title(title)
            ax.legend(title="band: ± 1 std over runs", fontsize="small", title_fontsize="small")
        fig.suptitle(f"{dataset}, {budget:,} steps: IQL's value function, each point one logged step's minibatch")
        written.append(
            (f"{dataset}, {budget:,} steps: V, advantages, AWR weights", save_figure(fig, out_dir, dataset, budget, "__value"))
        )
    return written


def begun_datasets(runs_dirs: list) -> set:
    """The datasets of every run begun under runs_dirs, finished or not: a grid under way shows all it will cover."""
    return {
        json.load(open(path))["env_id"]
        for runs_dir in runs_dirs
        for path in glob.glob(os.path.join(runs_dir, "*", "args.json"))
    }


def archive_runs(runs_dirs: list, archive_dir: str, metrics: dict, records: dict, awr_weights: bool) -> None:
    """Copy the finished runs of runs_dirs into archive_dir/{runs folder's name}/, with their training curves
    (training_metrics), their AWR statistics (with awr_weights, from their final networks) and, in archive_dir/datasets.json,
    the record and episode returns of the datasets of every run begun. What an earlier archiving stored and the sources no
    longer hold is kept."""
    os.makedirs(archive_dir, exist_ok=True)
    datasets_path = os.path.join(archive_dir, "datasets.json")
    archived = json.load(open(datasets_path)) if os.path.exists(datasets_path) else {}
    runs = load_runs(runs_dirs)
    for dataset in sorted(begun_datasets(runs_dirs)):
        # a dataset that benchmarks/datasets.py did not build (a Minari download) has no record
        record, before = records.get(dataset), archived.get(dataset, {"record": None})
        if record and before["record"] and record.get("sha256") != before["record"].get("sha256"):
            sys.exit(
                f"tables.py: {dataset} was rebuilt with other contents than the archived runs trained on "
                f"(sha256 {record.get('sha256')}, archived {before['record'].get('sha256')}); archive its runs elsewhere"
            )
        if "episode_returns" not in before:
            before["episode_returns"] = dataset_arrays(dataset).episode_returns.tolist()
        archived[dataset] = {**before, "record": record or before["record"]}
    awr = awr_results(runs) if awr_weights else {}
    for run in runs:
        target = os.path.join(archive_dir, os.path.basename(os.path.dirname(run["dir"])), os.path.basename(run["dir"]))
        os.makedirs(target, exist_ok=True)
        for name in ("args.json", "summary.json", "evaluations.jsonl"):
            shutil.copyfile(os.path.join(run["dir"], name), os.path.join(target, name))
        if run["commit"]:
            shutil.copyfile(commit_file(run["dir"]), os.path.join(target, "commit.txt"))
        steps = metrics.get(os.path.abspath(run["dir"]))
        if steps:
            path = os.path.join(target, "training.json")
            training = json.load(open(path)) if os.path.exists(path) else {"steps": {}}
            training["steps"].update({str(step): m for step, m in sorted(steps.items())})
            training["return_to_go"] = discounted_return_to_go(run)
            json.dump(training, open(path, "w"))
        if run["dir"] in awr:
            path = os.path.join(target, "awr_weights.json")
            stored = json.load(open(path)) if os.path.exists(path) else {"rows": {}, "pairs": {}}
            json.dump(
                {"rows": awr[run["dir"]]["rows"], "pairs": {**stored["pairs"], **awr[run["dir"]]["pairs"]}},
                open(path, "w"),
                indent=1,
            )
    json.dump(archived, open(datasets_path, "w"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", nargs="+", default=["logs/bench_runs"], help="folders of runs (runs/{run_name}/)")
    parser.add_argument("--write", help="a Markdown file whose block to replace; default: print")
    parser.add_argument(
        "--block", default="tables", help="with --write: the name in its <!-- NAME:start --> and <!-- NAME:end --> lines"
    )
    parser.add_argument("--curves", default="benchmarks/curves", help="folder for the learning-curve PNGs")
    parser.add_argument(
        "--train-logs",
        nargs="*",
        default=[],
        help="run_grid.py's output (one log per run_grid.py process), from which IQL's V and advantage curves are drawn "
        "for runs without a metrics.jsonl",
    )
    parser.add_argument(
        "--returns",
        action="store_true",
        help="per dataset, a figure of its episode returns with each method's final score (reads the datasets)",
    )
    parser.add_argument(
        "--awr-weights",
        action="store_true",
        help="a table of how each IQL run's final AWR weights spread over its dataset (reads the datasets)",
    )
    parser.add_argument(
        "--v-settling",
        action="store_true",
        help="a table of where each IQL run's mean V settles: within 5%% and 2%% of its last 10,000 steps' mean",
    )
    parser.add_argument(
        "--wall-time",
        action="store_true",
        help="a table of the hours each dataset's runs of each method took (summed over runs, seeds in brackets)",
    )
    parser.add_argument(
        "--late",
        action="store_true",
        help="per budget, a second score table: each seed's mean over its evaluations from half the budget on",
    )
    parser.add_argument(
        "--archive",
        help="copy the finished runs into this folder with all their tables need, "
        "and make the tables from the folder (see above)",
    )
    parser.add_argument(
        "--archived",
        nargs="+",
        help="with --archive: make the tables from these of its runs folders only (default: all), "
        "e.g. one block per group of grids",
    )
    parser.add_argument("--datasets-record", default=datasets_record(), help="written by benchmarks/datasets.py")
    args = parser.parse_args()
    if args.archived and not args.archive:
        parser.error("--archived names folders of --archive DIR; give --archive too")
    records, metrics = read_records(args.datasets_record), training_metrics(args.train_logs, args.runs_dir)
    trained_on = begun_datasets(args.runs_dir)
    if args.archive:
        archive_runs(args.runs_dir, args.archive, metrics, records, args.awr_weights)
        archived_dirs = sorted(glob.glob(os.path.join(args.archive, "*", "")))
        if args.archived:
            names = {os.path.basename(os.path.dirname(d)): d for d in archived_dirs}
            if unknown := sorted(set(args.archived) - set(names)):
                sys.exit(f"tables.py: {args.archive} has no runs folder {', '.join(unknown)} (it has {', '.join(names)})")
            archived_dirs = [names[name] for name in sorted(args.archived)]
        runs, metrics = load_runs(archived_dirs), {}
        archived = json.load(open(os.path.join(args.archive, "datasets.json")))
        records = {d: a["record"] for d, a in archived.items() if a["record"]}
        trained_on |= begun_datasets(archived_dirs)

        def episode_returns(dataset):
            return archived[dataset]["episode_returns"]
    else:
        runs = load_runs(args.runs_dir)

        def episode_returns(dataset):
            return dataset_arrays(dataset).episode_returns

    curves = learning_curves(runs, args.curves) + training_curves(runs, metrics, args.curves)
    curves += return_figures(runs, args.curves, episode_returns) if args.returns else []
    base = os.path.dirname(os.path.abspath(args.write)) if args.write else os.getcwd()
    scores = [
        (
            f"### Scores at {steps:,} gradient steps ({what}, mean ± std over seeds, number of seeds)",
            score_table(runs, steps, late),
        )
        for steps in budgets(runs)
        for late, what in (
            (False, "final evaluation"),
            *([(True, f"mean of the evaluations from step {steps // 2:,} on")] if args.late else []),
        )
    ]
    toy = toy_table(runs)
    published = [(steps, table) for steps in budgets(runs) if (table := published_table(runs, steps, records))]
    block = "\n\n".join(
        [
            *(
                part
                for steps, table in published
                for part in (f"### The IQL paper's nine MuJoCo rows at {steps:,} gradient steps, beside its numbers", table)
            ),
            "### Datasets as built",
            datasets_table(records, trained_on) if records else f"no {args.datasets_record}",
            *(part for pair in scores for part in pair),
            *(
                [
                    "### Where the AWR weights of the final V and Q fall "
                    "(IQL runs, both extractions; every step of the dataset)",
                    awr_weight_table(runs),
                ]
                if args.awr_weights
                else []
            ),
            *(
                [
                    "### Where IQL's mean V settles (mean over each 10,000 steps' logged minibatches)",
                    settling_table(runs, metrics),
                ]
                if args.v_settling
                else []
            ),
            *(
                ["### Wall time (hours, summed over each method's runs; seeds in brackets)", wall_time_table(runs)]
                if args.wall_time
                else []
            ),
            *(["### Toy two-step MDP: V(s1) against the expectile", toy] if toy else []),
            "### Learning curves",
            "\n".join(f"- [{d}]({os.path.relpath(p, base)})" for d, p in curves) or "–",
        ]
    )
    if not args.write:
        print(block)
        return
    text = open(args.write).read()
    start, end = f"<!-- {args.block}:start -->", f"<!-- {args.block}:end -->"
    head, rest = text.split(start)
    _, tail = rest.split(end)
    open(args.write, "w").write(f"{head}{start}\n{block}\n{end}{tail}")


if __name__ == "__main__":
    main()
