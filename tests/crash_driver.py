"""Run iql.py's or bc.py's main and kill it with SIGKILL just before its N-th checkpoint write: a
crash at a known point, with no chance to clean up.

    python tests/crash_driver.py iql 2 --env-id ... --checkpoint-freq 150
"""

import importlib
import os
import signal
import sys

import torch
import tyro

script, kill_at, *flags = sys.argv[1:]
module = importlib.import_module(script)
save, writes = torch.save, []


def save_or_die(checkpoint, file):
    """torch.save, which the scripts call only to write a checkpoint or model.pt."""
    writes.append(file)
    if len(writes) == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
    save(checkpoint, file)


torch.save = save_or_die
module.main(tyro.cli(module.Args, args=flags))
