"""Run IQL (concurrent and post-hoc), BC and 10% BC over datasets and seeds, one run at a time.

    # the local benchmark (datasets from benchmarks/datasets.py), a step budget that fits a CPU
    python benchmarks/run_grid.py --datasets local/pointmaze/umaze-v0 local/hopper/medium-v0 --seeds 1 2 3 --steps 20000
    # the paper's grid on the real Minari datasets (needs internet for the first download), 1M steps
    python benchmarks/run_grid.py --paper
    # after an interruption: continue every unfinished run under --runs-dir from its checkpoint
    python benchmarks/run_grid.py --resume-all --runs-dir logs/bench_runs
    # 3 seeds in one process each (iql.py and bc.py's --num-seeds), each finished run archived at once
    python benchmarks/run_grid.py --datasets local/walker2d/medium-v0 --seeds 1 --num-seeds 3 --steps 300000 \
        --runs-dir logs/walker2d_300k --archive benchmarks/results

Running a grid's command again continues it: a run already finished under --runs-dir is skipped, one
with a checkpoint is resumed, and only the runs not yet started (or stopped before any checkpoint) start.

Each run writes runs/{run_name}/ under --runs-dir; benchmarks/tables.py turns them into tables.
iql.py applies the paper's per-family hyperparameters itself; the grid adds only what the paper
has no family for (below). BC uses its defaults everywhere.
"""

import argparse
import dataclasses
import glob
import importlib
import json
import os
import re
import subprocess
import sys

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (pattern on the dataset id, iql.py flags), first match wins
IQL_FLAGS = [
    (r"pointmaze", ["--expectile", "0.9", "--temperature", "10.0"]),  # not in the paper: AntMaze's goal-reaching setting
    # locally built locomotion datasets: iql.py's `auto` reward normalisation keys on mujoco/ and d4rl/ only
    (r"^local/(hopper|halfcheetah|walker2d)", ["--reward-normalization", "locomotion"]),
]

# the datasets of the paper's Table 1 and 3 that Minari hosts (medium-replay and medium-expert of
# MuJoCo are not hosted; see benchmarks.md)
PAPER_DATASETS = [
    *(f"mujoco/{env}/medium-v0" for env in ("halfcheetah", "hopper", "walker2d")),
    *(
        f"D4RL/antmaze/{name}-v1"
        for name in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
    ),
    *(f"D4RL/kitchen/{name}-v2" for name in ("complete", "partial", "mixed")),
    *(f"D4RL/{env}/{name}-v2" for env in ("pen", "hammer", "door", "relocate") for name in ("human", "cloned")),
]


def iql_flags(dataset_id: str) -> list:
    for pattern, flags in IQL_FLAGS:
        if re.search(pattern, dataset_id):
            return flags
    return []


def commands(
    dataset_id: str, seed: int, steps: int, runs_dir: str, extra: list, expectiles: list, algos: list, policy_extraction="both"
) -> list:
    common = ["--env-id", dataset_id, "--seed", str(seed), "--total-steps", str(steps), "--runs-dir", runs_dir]
    iql_runs = [["iql.py", *common, *iql_flags(dataset_id), "--policy-extraction", policy_extraction]]
    if expectiles:  # an expectile scan, e.g. on the toy MDPs
        iql_runs = [[*iql_runs[0], "--expectile", str(e)] for e in expectiles]
    # BC names its --top-fraction even at 1, so that every planned run differs from the others in a flag it names
    runs = {
        "iql": iql_runs,
        "bc": [["bc.py", *common, "--top-fraction", "1.0"]],
        "bc10": [["bc.py", *common, "--top-fraction", "0.1"]],
    }
    return [run + extra for algo in algos for run in runs[algo]]  # the user's flags come last, so they override the defaults


def unfinished_runs(runs_dir: str) -> list:
    """(script, run folder) of every run under runs_dir that has no summary.json yet, oldest first."""
    runs = []
    for run_dir in sorted(glob.glob(os.path.join(runs_dir, "*", "args.json")), key=os.path.getmtime):
        run_dir = os.path.dirname(run_dir)
        if not os.path.exists(os.path.join(run_dir, "summary.json")):
            runs.append(
                ("bc.py" if "top_fraction" in json.load(open(os.path.join(run_dir, "args.json"))) else "iql.py", run_dir)
            )
    return runs


def earlier_run(runs_dir: str, command: list):
    """The run folder under runs_dir that `command` already made: same script, the same value for every flag it
    names. A finished one comes first, then one that can be resumed; None when the run has to start."""
    sys.path.insert(0, REPO)
    module = importlib.import_module(command[0][: -len(".py")])
    planned = dataclasses.asdict(tyro.cli(module.Args, args=command[1:]))
    named = [
        flag[2:].replace("-", "_") for flag in command[1:] if flag.startswith("--") and flag != "--runs-dir"
    ]  # where it lives is what the search is for
    found = []
    for path in glob.glob(os.path.join(runs_dir, "*", "args.json")):
        stored, run_dir = json.load(open(path)), os.path.dirname(path)
        stored = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
        if ("top_fraction" in stored) == (command[0] == "bc.py") and all(stored.get(k) == planned[k] for k in named):
            found.append(run_dir)
    for done in ("summary.json", "checkpoint.pt"):
        for run_dir in found:
            if os.path.exists(os.path.join(run_dir, done)):
                return run_dir
    return None


def pin_code_version(runs_dir: str) -> str:
    """The commit the code is at ("-dirty" with uncommitted changes), written to runs_dir/commit.txt by the first grid
    run there; a later grid run there from other code is refused, so that one table never mixes code versions."""

    def git(*words):
        return subprocess.run(["git", "-C", REPO, *words], capture_output=True, text=True, check=True).stdout.strip()

    commit = git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    path = os.path.join(runs_dir, "commit.txt")
    if os.path.exists(path) and open(path).read().strip() != commit:
        sys.exit(
            f"run_grid.py: the runs in {runs_dir} come from commit {open(path).read().strip()}, this checkout is at {commit}"
        )
    os.makedirs(runs_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(commit + "\n")
    return commit


def run(command: list) -> None:
    """One run; a run stopped by SIGTERM or SIGINT (it checkpointed: exit 143 or 130) stops the grid without a traceback."""
    code = subprocess.run(command).returncode
    if code in (130, 143):
        sys.exit("run_grid.py: a run was stopped (it wrote a checkpoint); run the same command again to continue the grid")
    if code != 0:
        sys.exit(f"run_grid.py: a run failed with exit code {code}: {' '.join(command)}")


def archive(runs_dir: str, archive_dir: str) -> None:
    """tables.py --archive --awr-weights of the grid's finished runs, made after each run ends, so that a result outlives
    a machine lost before the grid's end."""
    from benchmarks import datasets_record, tables

    records = tables.read_records(datasets_record())
    tables.archive_runs([runs_dir], archive_dir, tables.training_metrics([], [runs_dir]), records, awr_weights=True)
    print(f"# archived into {archive_dir}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=[])
    parser.add_argument("--paper", action="store_true", help="the paper's grid on the real Minari datasets, 1M steps, 3 seeds")
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=None, help="gradient steps per run (default: 1M with --paper)")
    parser.add_argument("--runs-dir", default="logs/bench_runs")
    parser.add_argument("--algos", nargs="*", choices=["iql", "bc", "bc10"], default=["iql", "bc", "bc10"])
    parser.add_argument("--expectiles", nargs="*", type=float, default=[], help="run IQL once per expectile")
    parser.add_argument(
        "--policy-extraction", choices=["both", "concurrent", "posthoc"], default="both", help="IQL's; BC has none"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--archive", help="after each run, archive the finished runs into this folder (tables.py --archive)")
    parser.add_argument(
        "--resume-all",
        action="store_true",
        help="continue every unfinished run under --runs-dir (with a checkpoint), and nothing else",
    )
    args, extra = parser.parse_known_args()  # anything else goes to every run of both scripts, e.g. --eval-freq 5000
    if not args.dry_run:
        print(f"# code: commit {pin_code_version(args.runs_dir)}", flush=True)
    if args.resume_all:
        for script, run_dir in unfinished_runs(args.runs_dir):
            if not os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
                print(
                    f"# {run_dir}: stopped before its first checkpoint; nothing to continue "
                    "(start it again by hand if wanted)",
                    flush=True,
                )
                continue
            print(f"python {script} --resume {run_dir}", flush=True)
            if not args.dry_run:
                run([sys.executable, os.path.join(REPO, script), "--resume", run_dir, *extra])
                if args.archive:
                    archive(args.runs_dir, args.archive)
        return
    datasets = PAPER_DATASETS if args.paper else args.datasets
    steps = args.steps or 1_000_000
    for dataset_id in datasets:
        for seed in args.seeds:
            for command in commands(
                dataset_id, seed, steps, args.runs_dir, extra, args.expectiles, args.algos, args.policy_extraction
            ):
                run_dir = earlier_run(args.runs_dir, command)
                if run_dir and os.path.exists(os.path.join(run_dir, "summary.json")):
                    print(f"# done: {run_dir}", flush=True)
                    continue
                if run_dir:
                    command = [command[0], "--resume", run_dir]
                print(" ".join(["python", *command]), flush=True)
                if not args.dry_run:
                    run([sys.executable, os.path.join(REPO, command[0]), *command[1:]])
                    if args.archive:
                        archive(args.runs_dir, args.archive)


if __name__ == "__main__":
    main()
