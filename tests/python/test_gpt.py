"""examples/torch/gpt.py against the C++ transformer (examples/transformer/model.hpp): loaded
from the same checkpoint, the same windows give the same loss and the same exact gradient.

The C++ side is examples/torch/model_grad.cpp, compiled here once (g++ -O0, into
build/sus-torch-helpers; rebuilt when a source is newer). Checkpoints: one written by
examples/train after 4 training steps on README.md (build/examples/train, built by scripts/test
before pytest runs; without it that case is skipped, visibly), and one freshly initialised by
the C++ model. Tolerances: float32 |Δloss| <= 1e-5·|loss| and, per parameter tensor,
‖Δg‖ <= 1e-5·‖g‖; float64 1e-10 for both.
"""
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

here = os.path.dirname(os.path.abspath(__file__))
repo = os.path.abspath(os.path.join(here, "..", ".."))
sys.path.insert(0, os.path.join(repo, "examples", "torch"))
import gpt  # noqa: E402

HELPER_DIR = os.path.join(repo, "build", "sus-torch-helpers")
HELPER = os.path.join(HELPER_DIR, "model_grad")
B, N = 2, 24


def helper():
    src = os.path.join(repo, "examples", "torch", "model_grad.cpp")
    deps = [src] + [os.path.join(d, f) for d in (os.path.join(repo, "examples", "transformer"),
                                                 os.path.join(repo, "include", "sus"))
                    for f in os.listdir(d) if f.endswith(".hpp")]
    if not os.path.exists(HELPER) or os.path.getmtime(HELPER) < max(map(os.path.getmtime, deps)):
        os.makedirs(HELPER_DIR, exist_ok=True)
        subprocess.run(["g++", "-std=c++17", "-O0", "-Wall", "-Wextra", "-I" + os.path.join(repo, "include"),
                        "-isystem", "/usr/include/eigen3", src, "-o", HELPER], check=True)
    return HELPER


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt")
    fresh = str(tmp / "fresh.ckpt")
    subprocess.run([helper(), "init", "2", "2", "8", "5", fresh], check=True)
    return {"fresh": fresh, "dir": tmp}


def cpp_loss_and_grad(dtype, checkpoint, tokens_path, out_path):
    subprocess.run([helper(), "grad", dtype, checkpoint, tokens_path, str(B), str(N), out_path], check=True)
    with open(out_path, "rb") as f:
        data = f.read()
    values = torch.tensor(struct.unpack(f"<{len(data) // 8}d", data), dtype=torch.float64)
    return values[0].item(), values[1:]


@pytest.mark.parametrize("source", ["fresh", "trained"])
@pytest.mark.parametrize("dtype,tol", [("f32", 1e-5), ("f64", 1e-10)])
@pytest.mark.parametrize("attention", ["dense", "torch"])
def test_gpt_matches_cpp_model(checkpoints, request, source, dtype, tol, attention):
    ckpt = checkpoints["fresh"] if source == "fresh" else request.getfixturevalue("trained_checkpoint")
    text = open(os.path.join(repo, "README.md"), "rb").read()
    window = text[1000:1000 + B * (N + 1)]
    tokens = checkpoints["dir"] / "tokens.bin"
    tokens.write_bytes(window)
    cpp_loss, cpp_grad = cpp_loss_and_grad(dtype, ckpt, str(tokens), str(checkpoints["dir"] / f"{source}-{dtype}.out"))
    model, _ = gpt.load_checkpoint(ckpt, attention, torch.float32 if dtype == "f32" else torch.float64)
    w = torch.tensor(list(window), dtype=torch.long).view(B, N + 1)
    loss = model(w[:, :-1], w[:, 1:])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert abs(loss.item() - cpp_loss) <= tol * abs(cpp_loss), (loss.item(), cpp_loss)
    offset = 0
    for name, g in zip(model.names, grads):
        ref = cpp_grad[offset:offset + g.numel()].view(g.shape)
        offset += g.numel()
        err = (g.double() - ref).norm().item()
        assert err <= tol * ref.norm().item() + 1e-300, f"{name}: |Δg| {err:.3g} vs |g| {ref.norm().item():.3g}"
    assert offset == cpp_grad.numel()


def test_brown_parsing_and_split_match_data_hpp(tmp_path):
    # The strings of tests/test_model.cpp's Brown test: the same text as data::brown_to_text.
    raw = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at 1-1/2/cd ''/'' ,/, it/pps (/( said/vbd )/) ./.\n\n"
           "Next/ap sentence/nn ./.\n\n\tNew/jj paragraph/nn ./.\n")
    assert gpt.brown_to_text(raw) == "The jury said \"no 1-1/2\", it (said). Next sentence.\nNew paragraph.\n"
    train, val = gpt.split_by_document([chr(ord("a") + k) for k in range(20)])
    assert bytes(val.tolist()) == b"j\nt" and train.numel() == 18 * 2 - 1
    # A Brown directory: files c[a-r]NN in name order, anything else ignored.
    for name, text in [("cb02", "Second/ap ./.\n"), ("ca01", "First/ap ./.\n"), ("README", "x/y\n")]:
        (tmp_path / name).write_text(text)
    assert gpt.load_documents(str(tmp_path)) == ["First.\n", "Second.\n"]


@pytest.mark.parametrize("attention", ["sus", "dense", "torch"])
def test_gpt_training_loop_logs_and_saves(tmp_path, capsys, attention):
    # A repetitive text of its own (not a file of the repository, whose edits would move the
    # windows): a few steps at lr 1e-2 lower the loss far beyond the noise of the batches.
    ckpt, data = str(tmp_path / "gpt.ckpt"), tmp_path / "text.txt"
    data.write_text(("the cat sat on the mat. " * 20 + "\n\n") * 200)
    gpt.main(["--data", str(data), "--attention", attention, "--layers", "1", "--heads", "2", "--head-dim", "8",
              "--n", "32", "--batch", "2", "--steps", "6", "--lr", "1e-2", "--log-every", "1", "--c", "4",
              "--save", ckpt])
    log = capsys.readouterr().out
    steps = [line for line in log.splitlines() if line.startswith("step")]
    assert len(steps) == 6 and all("attention" in line and "optimizer" in line for line in steps), log
    losses = [float(line.split("loss")[1].split()[0]) for line in steps]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.9 * losses[0], losses
    model, step = gpt.load_checkpoint(ckpt)
    assert step == 6 and model.cfg.n_layer == 1
