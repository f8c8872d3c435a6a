import ctypes.util
import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)
# Tests never reach the network: a missing dataset must fail at once, not after download retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
# Off-screen rendering where libOSMesa is installed; without it MUJOCO_GL=osmesa would break `import mujoco` itself.
if "MUJOCO_GL" not in os.environ and ctypes.util.find_library("OSMesa"):
    os.environ["MUJOCO_GL"] = "osmesa"


@pytest.fixture(scope="session")
def renderer():
    """Skips a --capture-video test where MuJoCo cannot render a frame (no display, no libOSMesa)."""
    frame = "import mujoco; mujoco.Renderer(mujoco.MjModel.from_xml_string('<mujoco/>'), 8, 8).render()"
    if subprocess.run([sys.executable, "-c", frame], capture_output=True).returncode != 0:  # it may crash, not raise
        pytest.skip("MuJoCo cannot render here: apt-get install -y libosmesa6")


@pytest.fixture(scope="session")
def minari_store(tmp_path_factory):
    """A temporary Minari store holding the tiny datasets, shared by the whole session."""
    path = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    from tests import datasets

    datasets.make_hopper_dataset()
    datasets.make_two_step_dataset("toy/twostep/fifty-v0", up_fraction=0.5)
    datasets.make_bandit_dataset("toy/bandit/fifty-v0", up_fraction=0.5)
    datasets.make_cartpole_dataset("toy/cartpole/tiny-v0")  # a discrete action space, which both scripts reject
    datasets.make_pointmaze_dataset()
    datasets.make_antmaze_dataset()
    datasets.make_kitchen_dataset()
    datasets.make_pen_dataset()
    datasets.make_pen_dataset(
        "D4RL/pen/tiny-other-refs-v0", ref_min_score=50.0, ref_max_score=5000.0
    )  # references of 200-step episodes
    yield path
    if old is None:
        del os.environ["MINARI_DATASETS_PATH"]
    else:
        os.environ["MINARI_DATASETS_PATH"] = old
