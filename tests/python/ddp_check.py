"""The per-rank body of test_ddp.py (a module of its own: torch.multiprocessing's spawned
children import it by name). Each check writes its figures to OUT/rank<r>.json."""
import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import ddp  # examples/torch/ddp.py
import gpt  # examples/torch/gpt.py
import sus_torch


def gather(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def rank_main(rank, world, port, out_dir):
    ddp.setup(rank, world, port, threads=1)
    cfg = gpt.Config(256, 2, 2, 16)
    model = gpt.GPT(cfg, "sus", c=4).init(0)  # n = 32 > c = 4: the masks drop most entries
    params = list(model.parameters())
    data = torch.Generator().manual_seed(10 + rank)
    x, y = torch.randint(0, 256, (2, 32), generator=data), torch.randint(0, 256, (2, 32), generator=data)
    res = {}

    # 1. This rank's single-process gradient (no DDP), its masks drawn after manual_seed(100).
    torch.manual_seed(100)
    local = torch.cat([g.flatten() for g in torch.autograd.grad(model(x, y), params)])
    local_seed = sus_torch.last_call()["seed"]
    # The DDP gradient from the same generator state: the same masks, then the all-reduce.
    ddp_model = DistributedDataParallel(model)
    torch.manual_seed(100)
    ddp_model(x, y).backward()
    assert sus_torch.last_call()["seed"] == local_seed
    reduced = torch.cat([p.grad.flatten() for p in params])
    mean = torch.stack(gather(local)).mean(0)
    res["allreduce_rel_err"] = ((reduced - mean).norm() / mean.norm()).item()
    res["allreduce_max_rel_err"] = max(
        ((p.grad - m).norm() / m.norm()).item()
        for p, m in zip(params, torch.split(mean, [p.numel() for p in params])) if m.norm() > 0
        for m in [m.view(p.shape)])
    model.zero_grad(set_to_none=True)

    # 2. Same data and generator state on both ranks: SUS gradients differ (the rank is in the
    # mask seed), dense ones agree bit for bit (so the difference is the masks').
    same = torch.Generator().manual_seed(7)
    xs, ys = torch.randint(0, 256, (2, 32), generator=same), torch.randint(0, 256, (2, 32), generator=same)
    torch.manual_seed(200)
    g_sus = torch.cat([g.flatten() for g in torch.autograd.grad(model(xs, ys), params)])
    seeds = gather(torch.tensor([sus_torch.last_call()["seed"]]))
    model.attention = "dense"
    g_dense = torch.cat([g.flatten() for g in torch.autograd.grad(model(xs, ys), params)])
    model.attention = "sus"
    sus_all, dense_all = gather(g_sus), gather(g_dense)
    res["sus_ranks_differ"] = not torch.equal(sus_all[0], sus_all[1])
    res["dense_ranks_equal"] = torch.equal(dense_all[0], dense_all[1])
    res["mask_seeds"] = [int(s) for s in seeds]

    # 3. Three DDP training steps, then rank 0 writes a checkpoint that every rank reloads: the
    # reloaded model's loss on a fixed batch equals the trained one's (the forward is exact).
    opt = torch.optim.AdamW(ddp_model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        ddp_model(x, y).backward()
        opt.step()
    path = os.path.join(out_dir, "ddp.ckpt")
    if rank == 0:
        gpt.save_checkpoint(path, model, 3)
    dist.barrier()
    reloaded, step = gpt.load_checkpoint(path, "sus", c=4)
    with torch.no_grad():
        res["trained_loss"] = model(xs, ys).item()
        res["reloaded_loss"] = reloaded(xs, ys).item()
    res["checkpoint_step"] = step
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()
