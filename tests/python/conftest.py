"""pytest setup for sus_torch: test the installed package if one is importable (scripts/test
installs it with pip into build/sus-torch-site and puts that on PYTHONPATH), else the one in
python/ built in place (`cd python && python3 setup.py build_ext --inplace`)."""
import os
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
