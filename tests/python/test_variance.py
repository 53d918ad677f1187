"""examples/torch/variance.py against the C++ tool examples/variance on the same checkpoint (4
steps of examples/train) and the same validation windows of README.md, n = 512 and 1024,
c = 8 and 32 (paper/systematic), M = 16 minibatches, K = 4, float32, one thread:
- equal exact gradients per minibatch: ‖g_m‖² (exact_norm2 of the errors CSVs) within 1e-5
  relative, which also shows that the windows are the same;
- ρ of each cell with overlapping 95% bootstrap CIs (both printed with pytest -s). The masks
  differ (the two tools seed them differently), the minibatches and bootstrap resamples do not.
"""
import csv
import os
import subprocess
import sys

from conftest import cpp_tool, repo

sys.path.insert(0, os.path.join(repo, "examples", "torch"))
import variance  # noqa: E402

ARGS = ["--data", os.path.join(repo, "README.md"), "--n", "512,1024", "--c", "8,32", "--variants", "paper/systematic",
        "--M", "16", "--K", "4", "--batch", "1", "--seed", "1", "--threads", "1", "--bootstrap", "2000"]


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_variance_matches_cpp_tool(trained_checkpoint, tmp_path):
    cpp_out, py_out = str(tmp_path / "cpp.csv"), str(tmp_path / "py.csv")
    subprocess.run([cpp_tool("variance"), "--checkpoint", trained_checkpoint, *ARGS, "--out", cpp_out], check=True,
                   capture_output=True)
    variance.main(["--checkpoint", trained_checkpoint, *ARGS, "--out", py_out])
    cpp_rows, py_rows = read(cpp_out), read(py_out)
    assert list(cpp_rows[0].keys()) == list(py_rows[0].keys())  # the same CSV columns
    cpp_err, py_err = read(str(tmp_path / "cpp_errors.csv")), read(str(tmp_path / "py_errors.csv"))
    assert len(cpp_err) == len(py_err) == 2 * 2 * 16
    for a, b in zip(cpp_err, py_err):
        assert (a["n"], a["c"], a["minibatch"]) == (b["n"], b["c"], b["minibatch"])
        x, y = float(a["exact_norm2"]), float(b["exact_norm2"])
        assert abs(x - y) <= 1e-5 * x, (a, b)
    for a, b in zip(cpp_rows, py_rows):
        assert (a["n"], a["c"]) == (b["n"], b["c"])
        lo = max(float(a["rho_lo"]), float(b["rho_lo"]))
        hi = min(float(a["rho_hi"]), float(b["rho_hi"]))
        print(f"n = {a['n']}, c = {a['c']}: C++ rho {float(a['rho']):.5f} [{float(a['rho_lo']):.5f}, "
              f"{float(a['rho_hi']):.5f}], PyTorch rho {float(b['rho']):.5f} [{float(b['rho_lo']):.5f}, "
              f"{float(b['rho_hi']):.5f}]; flow cut {float(a['flow_cut']):.4f} vs {float(b['flow_cut']):.4f}")
        assert lo <= hi, "the 95% CIs do not overlap"
