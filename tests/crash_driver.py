"""Run iql.py's or bc.py's main and kill it with SIGKILL just before its N-th checkpoint write: a
crash at a known point, with no chance to clean up.

    python tests/crash_driver.py iql 2 --env-id ... --checkpoint-freq 150
"""

import importlib
import os
import signal
import sys

import tyro

script, kill_at, *flags = sys.argv[1:]
module = importlib.import_module(script)
save_checkpoint, writes = module.save_checkpoint, []


def save_or_die(checkpoint, path):
    writes.append(path)
    if len(writes) == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
    save_checkpoint(checkpoint, path)


module.save_checkpoint = save_or_die
module.main(tyro.cli(module.Args, args=flags))
