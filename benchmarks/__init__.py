"""The benchmark tooling of benchmarks.md: datasets, behaviour policies, the grid runner, tables and speed."""

import os
import platform


def datasets_record() -> str:
    """The file where benchmarks/datasets.py appends a line per dataset it builds, beside the local Minari store."""
    store = os.environ.get("MINARI_DATASETS_PATH", os.path.expanduser("~/.minari/datasets"))
    return os.path.join(store, "local_datasets.jsonl")


def processor() -> str:
    """The CPU's model name (Linux), else what `platform` knows. Float results, and so a seeded SAC run, repeat exactly
    only on the same kind of processor."""
    if os.path.exists("/proc/cpuinfo"):
        return next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
    return platform.processor()
