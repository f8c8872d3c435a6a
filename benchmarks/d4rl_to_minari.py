"""Convert one of D4RL's MuJoCo locomotion files into a local Minari dataset, for iql.py and bc.py.

    python benchmarks/d4rl_to_minari.py ~/.d4rl/datasets/hopper_medium_replay-v2.hdf5   # writes d4rl/hopper/medium-replay-v2
    python benchmarks/d4rl_to_minari.py data.hdf5 --dataset-id d4rl/walker2d/medium-v2 [--overwrite]

Hopper, HalfCheetah and Walker2d files of versions v0, v1 and v2 are converted; the dataset goes to the local Minari store
($MINARI_DATASETS_PATH, default ~/.minari/datasets), evaluates in Gymnasium's Hopper-v5, HalfCheetah-v5 or Walker2d-v5 and
carries D4RL's reference returns as ref_min_score and ref_max_score.

The transitions are exactly those of D4RL's qlearning_dataset, which the paper's code trained on: a step flagged in
`timeouts` is dropped, the next observation is the next row (qlearning_dataset never reads `next_observations`), and the
file's last row is dropped. Episodes end at a terminal (terminated), where a timeout step was dropped (truncated), where a
v2 file's `next_observations` shows that the next row does not continue the step (truncated; the paper's code splits its
trajectories there too), and at the end of the file (truncated). An id that is already in the store is refused unless
--overwrite is given. A refused or bad file exits with status 2 and leaves the store as it was.
"""

import argparse
import contextlib
import os
import re
import shutil
import sys
import tempfile

import gymnasium as gym
import h5py
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer

# robot: (the Gymnasium environment it is evaluated in, D4RL's reference returns of a random and an expert policy)
ROBOTS = {
    "hopper": ("Hopper-v5", (-20.272305, 3234.3)),
    "halfcheetah": ("HalfCheetah-v5", (-280.178953, 12135.0)),
    "walker2d": ("Walker2d-v5", (1.629008, 4592.3)),
}
# D4RL's v0 files have no version in their names, call medium-replay "mixed", and walker2d's replay file "walker_mixed"
V0_NAMES = {"mixed": "medium-replay"}
V0_ROBOTS = {"walker": "walker2d"}
# (pattern on the file name or on the robot part of the id, why the family is not converted)
REFUSED_FAMILIES = [
    (
        r"ant_?maze",
        "AntMaze: D4RL's ant model and maze coordinates differ from Gymnasium-Robotics' AntMaze, where a policy would be "
        "evaluated; use Minari's D4RL/antmaze/* datasets, collected there",
    ),
    (
        r"maze2d",
        "Maze2D: D4RL's point-mass observations and maze coordinates differ from Gymnasium-Robotics' PointMaze; "
        "use Minari's D4RL/pointmaze/* datasets",
    ),
    (r"kitchen", "Kitchen: use Minari's D4RL/kitchen/* datasets, which Farama converted"),
    (
        r"^(pen|hammer|door|relocate)([-_]|$)",
        "Adroit: use Minari's D4RL/{pen,hammer,door,relocate}/* datasets, which Farama converted",
    ),
    (r"^flow([-_]|$)", "Flow: D4RL's SUMO traffic environments have no Gymnasium version to evaluate a policy in"),
    (r"carla", "CARLA: D4RL's CARLA driving environments have no Gymnasium version to evaluate a policy in"),
]
REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")
FILE_NAME = re.compile(r"(?P<robot>[a-z0-9]+)_(?P<name>[a-z_]+?)(?:-v(?P<version>\d+))?\.hdf5")
DATASET_ID = re.compile(r"(?:[-\w]+/)*(?P<robot>[-\w]+)/[-\w]+?-v\d+")
# the paper's code ends an episode where the next observation lies farther than this (L2) from the next row's
CONTINUITY_TOLERANCE = 1e-6
CONTINUES, TERMINATED, TIMEOUT, DISCONTINUITY, FILE_END = range(5)


def refuse(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def dataset_id_from_file_name(file_name: str):
    """The Minari id of D4RL's file name (hopper_medium_replay-v2.hdf5: d4rl/hopper/medium-replay-v2), else None."""
    match = FILE_NAME.fullmatch(os.path.basename(file_name))
    if match is None:
        return None
    robot = V0_ROBOTS.get(match["robot"], match["robot"])
    name = match["name"].replace("_", "-")
    return f"d4rl/{robot}/{V0_NAMES.get(name, name)}-v{match['version'] or 0}"


def refuse_other_families(*names: str):
    for name in names:
        for pattern, why in REFUSED_FAMILIES:
            if re.search(pattern, name.lower()):
                refuse(f"{name}: not converted. {why}")


def resolve_dataset_id(path: str, given_id):
    """The dataset id (given, else from D4RL's file name) and its robot; refuses other families and unknown robots."""
    file_name = os.path.basename(path)
    refuse_other_families(file_name)
    from_name = dataset_id_from_file_name(file_name)
    dataset_id = given_id or from_name
    if dataset_id is None:
        refuse(
            f"{file_name}: not a D4RL locomotion file name ({{robot}}_{{dataset}}-v{{N}}.hdf5); "
            "name the dataset with --dataset-id d4rl/ROBOT/DATASET-vN"
        )
    match = DATASET_ID.fullmatch(dataset_id)
    if match is None:
        refuse(f"{dataset_id}: not a dataset id of the form NAMESPACE/ROBOT/DATASET-vN, e.g. d4rl/hopper/medium-replay-v2")
    refuse_other_families(match["robot"])
    robot = match["robot"]
    if robot not in ROBOTS:
        refuse(f"{dataset_id}: {robot} is not one of the D4RL locomotion robots converted here ({', '.join(ROBOTS)})")
    name_robot = DATASET_ID.fullmatch(from_name)["robot"] if from_name else None
    if name_robot not in (None, robot):
        refuse(f"{file_name}: the file name says {name_robot}, the dataset id {dataset_id} says {robot}")
    return dataset_id, robot


def read_arrays(path: str) -> dict:
    """Every top-level dataset of the file, as arrays; `metadata/algorithm` as a string."""
    if not os.path.isfile(path):
        refuse(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        refuse(f"{path}: not an HDF5 file")
    with h5py.File(path, "r") as f:
        missing = [key for key in REQUIRED_KEYS if not isinstance(f.get(key), h5py.Dataset)]
        if missing:
            refuse(f"{path}: no `{missing[0]}` dataset (D4RL's files have {', '.join(REQUIRED_KEYS)})")
        arrays = {key: f[key][()] for key in f if isinstance(f[key], h5py.Dataset)}
        algorithm = f["metadata/algorithm"][()] if isinstance(f.get("metadata/algorithm"), h5py.Dataset) else None
    arrays["algorithm"] = algorithm.decode() if isinstance(algorithm, bytes) else None
    return arrays


def check_arrays(path: str, arrays: dict, robot: str) -> dict:
    """The arrays qlearning_dataset reads, as it reads them (float32, bool); refuses shapes and values that do not fit."""
    env = gym.make(ROBOTS[robot][0])
    sizes = {"observations": env.observation_space.shape[0], "actions": env.action_space.shape[0]}
    sizes["next_observations"] = sizes["observations"]
    rows = len(arrays["observations"]) if arrays["observations"].ndim else 0
    checked = {}
    for key in ("observations", "actions", "next_observations", "rewards", "terminals", "timeouts"):
        if key not in arrays:
            continue
        array = arrays[key]
        if key not in sizes and array.ndim == 2 and array.shape[1:] == (1,):  # as D4RL's get_dataset accepts
            array = array[:, 0]
        if array.ndim != (2 if key in sizes else 1):
            refuse(f"{path}: `{key}` has shape {array.shape}; D4RL's has " + ("(rows, values)" if key in sizes else "(rows,)"))
        if len(array) != rows:
            refuse(f"{path}: `{key}` has {len(array)} rows, `observations` {rows}: the lengths disagree")
        if key in sizes and array.shape[1] != sizes[key]:
            refuse(f"{path}: `{key}` has {array.shape[1]} values per row, {robot}'s have {sizes[key]} ({ROBOTS[robot][0]})")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            refuse(f"{path}: `{key}` holds {array.dtype} values, not numbers")
        array = array.astype(bool if key in ("terminals", "timeouts") else np.float32)
        bad = np.flatnonzero(~np.isfinite(array).reshape(rows, -1).all(axis=1))
        if len(bad):
            more = f" ({len(bad):,} rows in all)" if len(bad) > 1 else ""
            refuse(f"{path}: `{key}` holds non-finite values at row {bad[0]}{more}")
        checked[key] = array
    if rows < 2:
        refuse(f"{path}: `observations` has fewer than two rows; a transition needs two")
    return checked


def d4rl_timeouts(terminals: np.ndarray, horizon: int) -> np.ndarray:
    """qlearning_dataset's stand-in for a file without `timeouts`: a step is one when it has counted horizon - 1 kept steps.
    Its count restarts at 0 after a timeout but at 1 after a terminal step; kept as D4RL has it, to give D4RL's transitions."""
    timeouts = np.zeros(len(terminals), dtype=bool)
    step = 0
    for i, terminal in enumerate(terminals[:-1].tolist()):
        if step == horizon - 1:
            timeouts[i], step = True, 0
        else:
            step = 1 if terminal else step + 1
    return timeouts


def episode_ends(data: dict) -> tuple:
    """The rows qlearning_dataset keeps, their next observations, and how each kept row ends its episode (CONTINUES: not)."""
    observations, timeouts = data["observations"], data["timeouts"]
    last = len(observations) - 1
    keep = ~timeouts
    keep[last] = False
    rows = np.flatnonzero(keep)
    after = rows + 1
    next_observations = observations[after]
    at_timeout = timeouts[after]
    at_file_end = (after == last) & ~at_timeout
    true_next = data["next_observations"][rows] if "next_observations" in data else next_observations
    gap = np.linalg.norm(true_next - next_observations, axis=1) > CONTINUITY_TOLERANCE
    ends = np.select(
        [data["terminals"][rows], at_timeout, at_file_end, gap], [TERMINATED, TIMEOUT, FILE_END, DISCONTINUITY], CONTINUES
    )
    return rows, next_observations, ends


def episode_buffers(data: dict, rows: np.ndarray, next_observations: np.ndarray, ends: np.ndarray) -> list:
    """Minari episodes; an episode's kept rows are consecutive in the file, and its last observation is its last next one."""
    episodes, start = [], 0
    for end in np.flatnonzero(ends != CONTINUES).tolist():
        span = slice(rows[start], rows[end] + 1)
        terminated = ends[end] == TERMINATED
        flags = np.zeros(end - start + 1, dtype=bool)
        episodes.append(
            EpisodeBuffer(
                id=len(episodes),
                observations=np.concatenate([data["observations"][span], next_observations[end][None]]),
                actions=data["actions"][span],
                rewards=data["rewards"][span],
                terminations=np.r_[flags[:-1], terminated],
                truncations=np.r_[flags[:-1], not terminated],
                infos={},
            )
        )
        start = end + 1
    return episodes


@contextlib.contextmanager
def minari_store(path: str):
    """Minari's functions read and write the store named by MINARI_DATASETS_PATH at each call."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def write_dataset(store: str, dataset_id: str, robot: str, episodes: list, source: str, algorithm) -> None:
    """Build the dataset in a hidden folder of the store, which Minari does not list, and move it into place at the end,
    so that a failure part-way leaves the store as it was; an existing dataset of that id is replaced only then."""
    env_id, (ref_min, ref_max) = ROBOTS[robot]
    os.makedirs(store, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".d4rl_to_minari-", dir=store)
    try:
        with minari_store(staging):
            minari.create_dataset_from_buffers(
                dataset_id,
                episodes,
                env=gym.spec(env_id),
                eval_env=gym.spec(env_id),
                algorithm_name=f"D4RL ({algorithm})" if algorithm else "D4RL",
                author="Justin Fu, Aviral Kumar, Ofir Nachum, George Tucker, Sergey Levine (D4RL)",
                author_email="https://github.com/Farama-Foundation/D4RL",
                code_permalink="benchmarks/d4rl_to_minari.py",
                ref_min_score=ref_min,
                ref_max_score=ref_max,
                description=f"D4RL's {source}, collected in Gym's {env_id.replace('-v5', '-v3')} (mujoco-py), as the "
                f"transitions of D4RL's qlearning_dataset; evaluated in Gymnasium's {env_id}",
            )
        parts = dataset_id.split("/")
        for depth in range(1, len(parts)):  # namespace folders and their metadata, where the store lacks them
            namespace = os.path.join(store, *parts[:depth])
            os.makedirs(namespace, exist_ok=True)
            if not os.path.exists(os.path.join(namespace, "namespace_metadata.json")):
                shutil.copy(os.path.join(staging, *parts[:depth], "namespace_metadata.json"), namespace)
        target, replaced = os.path.join(store, dataset_id), os.path.join(staging, "replaced")
        if os.path.exists(target):
            os.rename(target, replaced)
        try:
            os.rename(os.path.join(staging, dataset_id), target)
        except OSError:
            if os.path.exists(replaced):  # the old dataset goes back rather than out with the staging folder
                os.rename(replaced, target)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def summarize(source: str, data: dict, rows: np.ndarray, ends: np.ndarray, has_timeouts: bool) -> str:
    total = len(data["observations"])
    counts = np.bincount(ends, minlength=5)
    timeout_rows = int(data["timeouts"][:-1].sum())
    dropped = f"{timeout_rows:,} timeout rows" + (
        "" if has_timeouts else " (no `timeouts` in the file: qlearning_dataset's step count)"
    )
    return (
        f"{source}: {total:,} rows, {len(rows):,} transitions, {int((ends != CONTINUES).sum()):,} episodes "
        f"({counts[TERMINATED]:,} terminated, {counts[TIMEOUT]:,} truncated at timeouts, {counts[DISCONTINUITY]:,} cut at "
        f"discontinuities, {counts[FILE_END]:,} truncated at the file's end)\n"
        f"dropped: {dropped} and the file's last row; next observations: the next row"
        + (" (discontinuities found with `next_observations`)" if "next_observations" in data else "")
    )


def convert(path: str, dataset_id=None, overwrite: bool = False) -> str:
    """Write the file's dataset into the local Minari store; its id."""
    dataset_id, robot = resolve_dataset_id(path, dataset_id)
    store = os.path.abspath(os.path.expanduser(os.environ.get("MINARI_DATASETS_PATH") or "~/.minari/datasets"))
    if os.path.exists(os.path.join(store, dataset_id)) and not overwrite:
        refuse(f"{dataset_id} is already in the Minari store ({store}); give --overwrite to replace it")
    arrays = read_arrays(path)
    data = check_arrays(path, arrays, robot)
    has_timeouts = "timeouts" in data
    if not has_timeouts:
        data["timeouts"] = d4rl_timeouts(data["terminals"], gym.spec(ROBOTS[robot][0]).max_episode_steps)
    rows, next_observations, ends = episode_ends(data)
    if len(rows) == 0:
        refuse(f"{path}: `timeouts` flags every row but the last, so no transition is left")
    episodes = episode_buffers(data, rows, next_observations, ends)
    source = os.path.basename(path)
    print(summarize(source, data, rows, ends, has_timeouts), flush=True)
    write_dataset(store, dataset_id, robot, episodes, source, arrays["algorithm"])
    print(f"wrote {dataset_id} to {store}: evaluated in {ROBOTS[robot][0]}, D4RL's reference returns {ROBOTS[robot][1]}")
    return dataset_id


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a D4RL locomotion file, e.g. ~/.d4rl/datasets/hopper_medium_replay-v2.hdf5")
    parser.add_argument("--dataset-id", default=None, help="default: from D4RL's file name, e.g. d4rl/hopper/medium-replay-v2")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset of that id in the store")
    args = parser.parse_args(argv)
    return convert(args.path, args.dataset_id, args.overwrite)


if __name__ == "__main__":
    main()
