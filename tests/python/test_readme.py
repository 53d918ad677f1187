"""Acceptance 9: the usage snippet of README.md's "## PyTorch" section runs as written (it is
read from the README, so the two cannot drift apart)."""
import contextlib
import io
import os
import re

import torch

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")


def readme_snippet():
    text = open(README, encoding="utf-8").read()
    section = text.split("\n## PyTorch\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "no ```python block in the README's PyTorch section"
    return blocks[0]


def test_readme_snippet_runs():
    code = readme_snippet()
    assert len(code.strip().splitlines()) == 5, "the README promises a five-line snippet"
    out = io.StringIO()
    scope = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md (PyTorch snippet)", "exec"), scope)
    assert out.getvalue().strip() == "torch.Size([2, 1024, 8, 64])"
    q = scope["q"]
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
