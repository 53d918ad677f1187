"""Acceptance 7: the GPT of examples/torch/gpt.py with SUS attention under DistributedDataParallel,
gloo backend, 2 processes on 127.0.0.1 (torch.multiprocessing), bounded by a 240 s deadline
(and the process group's 60 s timeout):
- the all-reduced gradient equals the mean of the two ranks' single-process gradients with
  the same masks: ‖g_ddp − mean‖ / ‖mean‖ <= 1e-6, over all parameters and per tensor;
- the ranks draw different masks: same data and generator state, different SUS gradients
  and mask seeds, while the dense gradients agree bit for bit;
- a checkpoint written by rank 0 after three DDP steps reloads (on both ranks) and gives the
  same loss on a fixed batch.
The per-rank body is ddp_check.rank_main.
"""
import json
import os
import sys
import time

import torch.multiprocessing as mp

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "examples", "torch"))

import ddp  # noqa: E402
import ddp_check  # noqa: E402

DEADLINE_S = 240


def test_ddp_two_processes_gloo(tmp_path):
    world = 2
    ctx = mp.start_processes(ddp_check.rank_main, args=(world, ddp.free_port(), str(tmp_path)), nprocs=world,
                             join=False, start_method="spawn")
    t0 = time.monotonic()
    try:
        while not ctx.join(timeout=1):  # raises if a rank failed, with its traceback
            assert time.monotonic() - t0 < DEADLINE_S, f"DDP ranks still running after {DEADLINE_S} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(world)]
    print(f"DDP ({time.monotonic() - t0:.1f} s):", res)
    for r in res:
        assert r["allreduce_rel_err"] <= 1e-6, r
        assert r["allreduce_max_rel_err"] <= 1e-6, r
        assert r["sus_ranks_differ"] and r["dense_ranks_equal"], r
        assert r["mask_seeds"][0] != r["mask_seeds"][1], r
        assert r["reloaded_loss"] == r["trained_loss"] and r["checkpoint_step"] == 3, r
    assert res[0]["trained_loss"] == res[1]["trained_loss"]  # DDP kept the replicas equal
