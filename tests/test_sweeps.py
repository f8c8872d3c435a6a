"""Every W&B sweep config names real flags with accepted values, and a generated command runs."""

import glob
import itertools
import os
import subprocess
import sys

import pytest
import tyro
import yaml

import bc
import iql
from tests.test_iql import REPO

SWEEPS = sorted(glob.glob(os.path.join(REPO, "sweeps", "*.yaml")))
SCRIPTS = {"iql.py": iql, "bc.py": bc}


def render(parameters: dict) -> list:
    """What W&B's ${args_no_boolean_flags} expands to: --key=value, and a bare --key for true booleans."""
    args = []
    for key, value in parameters.items():
        if isinstance(value, bool):
            args += [f"--{key}"] if value else []
        else:
            args.append(f"--{key}={value}")
    return args


def grid(config: dict):
    names = list(config["parameters"])
    choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in config["parameters"].values()]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def command(config: dict, parameters: dict) -> list:
    expanded = []
    for part in config["command"]:
        if part == "${program}":
            expanded.append(os.path.join(REPO, config["program"]))
        elif part == "${args_no_boolean_flags}":
            expanded += render(parameters)
        else:
            expanded.append(sys.executable if part == "python" else part)
    return expanded


# a sweep's run cut to a few steps, logging to W&B offline
QUICK = ["--total-steps", "20", "--batch-size", "16", "--hidden-dims", "16", "16", "--eval-freq", "0"]
QUICK += ["--final-eval-episodes", "2", "--log-freq", "10"]


def offline_env() -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": REPO, "WANDB_SILENT": "true"}


def test_there_are_sweeps_for_every_family():
    names = {os.path.basename(p) for p in SWEEPS}
    assert {"iql_mujoco.yaml", "iql_antmaze.yaml", "iql_antmaze_finetune.yaml", "iql_kitchen.yaml", "iql_adroit.yaml"} <= names
    assert "bc.yaml" in names


@pytest.mark.parametrize("path", SWEEPS, ids=os.path.basename)
def test_every_parameter_is_a_real_flag_with_an_accepted_value(path):
    config = yaml.safe_load(open(path))
    script = SCRIPTS[config["program"]]
    assert "${args_no_boolean_flags}" in config["command"]
    for key, spec in config["parameters"].items():
        field = key.replace("-", "_")
        assert field in script.Args.__dataclass_fields__, f"{key} is not a flag of {config['program']}"
        for value in spec["values"] if "values" in spec else [spec["value"]]:
            args = tyro.cli(script.Args, args=render({key: value}))
            assert getattr(args, field) == value
    for parameters in grid(config):  # every combination passes the script's own checks
        args = tyro.cli(script.Args, args=render(parameters))
        script.validate_args(script.resolve_paper_settings(args)[0] if script is iql else script.resolve_settings(args))
    # the metric a sweep optimises is one the script logs: eval/{policy}_final/score_mean
    policy = "bc" if config["program"] == "bc.py" else "concurrent"
    assert config["metric"]["name"] == f"eval/{policy}_final/score_mean"
    # a search that chooses where to go next (bayes, random) must not be handed the seed as a knob: it
    # would optimise the seed; its seeds go inside each run (--num-seeds), whose metric is their mean
    if config["method"] != "grid":
        assert "seed" not in config["parameters"] and config["parameters"]["num-seeds"]["value"] > 1


def test_a_multi_seed_sweep_run_logs_each_seed_and_the_mean_it_optimises(minari_store, tmp_path):
    config = yaml.safe_load(open(os.path.join(REPO, "sweeps", "iql_expectile_temperature.yaml")))
    parameters = {**grid(config)[0], "env-id": "mujoco/hopper/tiny-v0", "policy-extraction": "concurrent"}
    result = subprocess.run(
        command(config, parameters) + QUICK, cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    (records,) = glob.glob(str(tmp_path / "runs" / "*" / "wandb" / "offline-run-*" / "*.wandb"))
    logged = open(records, "rb").read()
    assert all(
        key.encode() in logged
        for key in [config["metric"]["name"], *(f"eval/concurrent_final/seed_{s}/score_mean" for s in (1, 2, 3))]
    )


def test_a_sweep_command_runs_end_to_end_offline(minari_store, tmp_path):
    config = yaml.safe_load(open(os.path.join(REPO, "sweeps", "iql_mujoco.yaml")))
    parameters = grid(config)[0]
    parameters["env-id"] = "mujoco/hopper/tiny-v0"  # the offline stand-in for the real dataset
    result = subprocess.run(
        command(config, parameters) + QUICK, cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    # an offline run keeps its records in a binary .wandb file, where the logged keys stand in clear
    (records,) = glob.glob(str(tmp_path / "runs" / "*" / "wandb" / "offline-run-*" / "*.wandb"))
    assert config["metric"]["name"].encode() in open(records, "rb").read()


def test_the_fine_tuning_sweep_logs_the_offline_policy_and_the_online_episodes(minari_store, tmp_path):
    config = yaml.safe_load(open(os.path.join(REPO, "sweeps", "iql_antmaze_finetune.yaml")))
    parameters = {**grid(config)[0], "env-id": "D4RL/antmaze/umaze-tiny-v0", "online-steps": 30, "eval-episodes": 2}
    quick = QUICK + ["--eval-freq", "25"]  # the sweep's own every 100,000 steps would never come
    result = subprocess.run(
        command(config, parameters) + quick, cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    (records,) = glob.glob(str(tmp_path / "runs" / "*" / "wandb" / "offline-run-*" / "*.wandb"))
    logged = open(records, "rb").read()
    for key in [config["metric"]["name"], "eval/offline/score_mean", "eval/concurrent/score_mean", "charts/online_return"]:
        assert key.encode() in logged, key
    assert b"charts/env_steps_per_second" in logged and b"charts/online_length" in logged
