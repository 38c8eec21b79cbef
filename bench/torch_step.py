#!/usr/bin/env python3
"""PyTorch eager's time for one training step on the shapes of dpart's GPU checks (issue 8):

  gpt2   GPT-2 small (12 layers, hidden 768, 12 heads, vocab 50257, learned positions, pre-norm
         LayerNorm, exact-erf GELU MLP, LM head tied to the token embedding), batch 8, sequence
         1024, softmax cross-entropy over every position.
  mlp    A wide MLP: 4 linear layers 8192 x 8192 with ReLU between, batch 8192, cross-entropy
         over 8192 classes.

As dpart's CUDA backend computes: fp32 master weights and Adam (lr 1e-3), matrix products in
bf16 (torch.autocast), one step = forward, loss, backward, optimizer step. The GPT-2 step is
timed twice: attention through scaled_dot_product_attention (PyTorch's fused kernels, what eager
users get) and through explicit matmul + masked softmax + matmul (the products dpart runs).

Prints one CSV row per case: case,variant,median_ms,min_ms,steps (CUDA-event timed, after warm-up).
Usage: torch_step.py [gpt2|mlp|all] [--steps N]
"""
import argparse
import math
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, hidden, heads, ffn, fused):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.ln1 = nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, ffn)
        self.down = nn.Linear(ffn, hidden)

    def attention(self, x):
        b, s, h = x.shape
        d = h // self.heads
        q, k, v = (t(x).view(b, s, self.heads, d).transpose(1, 2) for t in (self.q, self.k, self.v))
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            o = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v
        return self.o(o.transpose(1, 2).reshape(b, s, h))

    def forward(self, x):
        x = x + self.attention(self.ln1(x))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Gpt2(nn.Module):
    def __init__(self, fused, layers=12, hidden=768, heads=12, vocab=50257, positions=1024):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(positions, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, 4 * hidden, fused) for _ in range(layers))
        self.ln = nn.LayerNorm(hidden)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for b in self.blocks:
            x = b(x)
        return self.ln(x) @ self.wte.weight.t()  # the head tied to the token embedding


def time_steps(model, make_batch, loss_of, steps, warmup=3):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = make_batch()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        loss = loss_of(out.float(), y)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        step()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("case", nargs="?", default="all", choices=["gpt2", "mlp", "all"])
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    print("case,variant,median_ms,min_ms,steps")
    if a.case in ("gpt2", "all"):
        for fused in (True, False):
            model = Gpt2(fused).to(dev)
            batch = lambda: (torch.randint(0, 50257, (8, 1024), device=dev), torch.randint(0, 50257, (8, 1024), device=dev))
            loss = lambda out, y: F.cross_entropy(out.view(-1, out.shape[-1]), y.view(-1))
            med, low = time_steps(model, batch, loss, a.steps)
            print(f"gpt2-small b8 s1024,{'sdpa' if fused else 'unfused'},{med:.4f},{low:.4f},{a.steps}", flush=True)
            del model
            torch.cuda.empty_cache()
    if a.case in ("mlp", "all"):
        n = 8192
        layers = []
        for i in range(4):
            layers.append(nn.Linear(n, n))
            if i < 3:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers).to(dev)
        batch = lambda: (torch.rand(n, n, device=dev) * 2 - 1, torch.randint(0, n, (n,), device=dev))
        med, low = time_steps(model, batch, F.cross_entropy, a.steps)
        print(f"wide-mlp 4x8192 b8192,eager,{med:.4f},{low:.4f},{a.steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
