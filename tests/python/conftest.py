"""pytest setup for sus_torch: import the package from python/ (built in place by scripts/test,
or `cd python && python3 setup.py build_ext --inplace`), else an installed one."""
import os
import sys

import pytest
import torch

here = os.path.dirname(os.path.abspath(__file__))
repo = os.path.dirname(os.path.dirname(here))
sys.path.insert(0, os.path.join(repo, "python"))
sys.path.insert(0, here)


@pytest.fixture(autouse=True)
def restore_threads():
    """Tests that change torch's thread count leave it as they found it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
