"""Histograms of a Minari dataset's raw rewards, episode lengths and returns, and how its episodes end: what to look at
before training on it.

    python benchmarks/dataset_overview.py mujoco/hopper/medium-v0   # writes runs/dataset_overview/hopper_medium-v0.png
    python benchmarks/dataset_overview.py D4RL/antmaze/umaze-v1 --out umaze.png

It draws with matplotlib, from benchmarks/requirements.txt (part of requirements-dev.txt); iql.py and bc.py need none.
"""

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, when run as a script
import iql  # noqa: E402


def plot_dataset_overview(data: iql.OfflineData, dataset_id: str, path: str) -> None:
    """Histograms of the raw data, log counts from 0.5 (a count of 1 shows), integer bins for integer quantities."""
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    lengths = f"episode lengths ({len(data.episode_lengths):,} episodes)"
    panels = [
        (data.rewards, f"step rewards ({len(data.rewards):,} steps)", "reward of a step", "steps", "tab:red"),
        (data.episode_lengths, lengths, "episode length (steps)", "episodes", "tab:green"),
        (data.episode_returns, "episode returns", "episode return (sum of the raw rewards)", "episodes", "tab:blue"),
    ]
    for ax, (values, title, xlabel, counted, color) in zip(axes.flat, panels):
        bins, integers = 50, bool(np.all(values == np.round(values)))
        if integers:
            lo, hi = int(values.min()), int(values.max())
            bins = np.arange(lo - 0.5, hi + math.ceil((hi - lo + 1) / 50), math.ceil((hi - lo + 1) / 50))
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True, min_n_ticks=1))
        ax.hist(values, bins=bins, color=color, rwidth=0.8 if integers else None)
        ax.set(title=title, xlabel=xlabel, ylabel=f"{counted} (log scale)", yscale="log", ylim=(0.5, None))
    ends = [int(data.terminations.sum()), int(data.truncations.sum())]
    axes[1, 1].bar_label(axes[1, 1].bar(["terminations", "truncations"], ends, color=["tab:orange", "tab:purple"]))
    axes[1, 1].set(title="how episodes end", ylabel="episodes", ymargin=0.1)
    fig.suptitle(dataset_id)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_id", help="a Minari dataset id, from the local store or downloaded")
    parser.add_argument("--out", help="the figure's path (default: runs/dataset_overview/{name}_{version}.png)")
    cli = parser.parse_args()
    try:  # before the data are loaded, which takes a while
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise SystemExit("error: the overview draws with matplotlib: pip install -r benchmarks/requirements.txt") from None
    out = cli.out or os.path.join("runs", "dataset_overview", "_".join(cli.dataset_id.split("/")[-2:]) + ".png")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    plot_dataset_overview(iql.flatten_dataset(iql.load_minari_dataset(cli.dataset_id)), cli.dataset_id, out)
    print(f"wrote {out}")
