"""pytest setup for sus_torch: test the installed package if one is importable (scripts/test
installs it with pip into build/sus-torch-site and puts that on PYTHONPATH), else the one in
python/ built in place (`cd python && python3 setup.py build_ext --inplace`)."""
import os
import subprocess
import sys

import pytest
import torch

here = os.path.dirname(os.path.abspath(__file__))
repo = os.path.dirname(os.path.dirname(here))
sys.path.insert(0, here)
try:
    import sus_torch
except ImportError:
    sys.path.insert(0, os.path.join(repo, "python"))
    import sus_torch


def pytest_report_header(config):
    return f"sus_torch: {os.path.dirname(sus_torch.__file__)}, torch {torch.__version__}"


@pytest.fixture(autouse=True)
def restore_threads():
    """Tests that change torch's thread count leave it as they found it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


BUILD = os.path.join(repo, "build")


def cpp_tool(name):
    """build/examples/NAME (built by scripts/test before pytest runs); skip visibly without it."""
    path = os.path.join(BUILD, "examples", name)
    if not os.path.exists(path):
        pytest.skip(f"{path} is not built (cmake --build build, or scripts/test)")
    return path


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """A checkpoint written by examples/train: 2 layers x 2 heads x head dim 8, 4 steps on
    README.md (n = 32, batch 2, one thread)."""
    out = str(tmp_path_factory.mktemp("train") / "trained.ckpt")
    subprocess.run([cpp_tool("train"), "--data", os.path.join(repo, "README.md"), "--out", out, "--steps", "4",
                    "--n", "32", "--batch", "2", "--layers", "2", "--heads", "2", "--head-dim", "8", "--threads", "1",
                    "--eval-every", "4", "--eval-batches", "1"], check=True, capture_output=True)
    return out
