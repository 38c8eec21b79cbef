#!/usr/bin/python3
"""Cross-check of `dpart run` against PyTorch on the seed MLP.

Builds the same model in PyTorch (Linear 100->50, ReLU, Linear 50->10, cross-entropy) with the
same initial weights and the same data, drawn here from dpart's counter-based generator
(splitmix64, re-implemented below), trains it with the same optimizer, and checks that the loss
of every step equals dpart's (summary.toml `loss`) within 1e-5 relative.

Usage: torch_crosscheck.py DPART SOURCE_DIR
Needs Debian's python3-torch (scripts/setup.sh installs it).
"""
import os
import subprocess
import sys
import tempfile
import tomllib

import torch

MASK = (1 << 64) - 1


def mix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def random_bits(seed, stream, index):
    return mix64(mix64(mix64(seed) ^ stream) ^ index)


def random_symmetric(seed, stream, index):
    # 24 random bits -> [0, 1) -> [-1, 1): exact in float32, as in tensor.hpp.
    u = (random_bits(seed, stream, index) >> 40) / 16777216.0
    return 2.0 * u - 1.0


INPUT, LABEL, WEIGHT = 1, 2, 3


def stream_of(kind, layer=0):
    return (kind << 48) ^ layer


def init_linear(seed, layer, out_f, in_f):
    """dpart's init: weights uniform in [-1, 1) x 1/sqrt(fan_in) by index, biases zero."""
    stream = stream_of(WEIGHT, layer)
    w = torch.tensor([random_symmetric(seed, stream, j) for j in range(out_f * in_f)], dtype=torch.float32)
    scale = torch.tensor(1.0, dtype=torch.float32) / torch.sqrt(torch.tensor(float(in_f), dtype=torch.float32))
    return (w * scale).reshape(out_f, in_f), torch.zeros(out_f, dtype=torch.float32)


def batch(seed, iteration, global_batch, dataset_batches):
    first = (iteration % dataset_batches) * global_batch
    x = torch.tensor([[random_symmetric(seed, stream_of(INPUT), (first + i) * 100 + j) for j in range(100)]
                      for i in range(global_batch)], dtype=torch.float32)
    y = torch.tensor([random_bits(seed, stream_of(LABEL), first + i) % 10 for i in range(global_batch)])
    return x, y


def torch_losses(seed, iterations, global_batch, dataset_batches, optimizer, lr):
    model = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10))
    with torch.no_grad():
        for layer_index, module in ((0, model[0]), (2, model[2])):
            w, b = init_linear(seed, layer_index, module.out_features, module.in_features)
            module.weight.copy_(w)
            module.bias.copy_(b)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=False)
    losses = []
    for it in range(iterations):
        x, y = batch(seed, it, global_batch, dataset_batches)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def dpart_losses(dpart, src, tmp, plan, optimizer, lr, seed, iterations, dataset_batches):
    out = os.path.join(tmp, f"{os.path.basename(plan)}-{optimizer}")
    subprocess.run([dpart, "run", plan, "-m", f"{src}/plans/models/seed-mlp.toml", "-c",
                    f"{src}/plans/clusters/cpu-local.toml", "--optimizer", optimizer, "--lr", str(lr), "--seed",
                    str(seed), "--iterations", str(iterations), "--dataset-batches", str(dataset_batches),
                    "--out-dir", out], check=True,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "summary.toml"), "rb") as f:
        return tomllib.load(f)["summary"]["loss"]


def main():
    dpart, src = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    seed, iterations, global_batch, dataset_batches = 11, 12, 64, 3
    failures = checks = 0
    with tempfile.TemporaryDirectory() as tmp:
        plans = {}
        plans["1 stage"] = os.path.join(tmp, "one.toml")
        plans["2 stages, 4 microbatches"] = os.path.join(tmp, "two.toml")
        with open(plans["1 stage"], "w") as f:
            f.write('[plan]\nobjective = "iteration"\nschedule = "1f1b"\nmicrobatch_size = 64\nmicrobatches = 1\n'
                    '[[stage]]\nfirst_layer = 0\nlast_layer = 3\ndevices = ["cpu0"]\ntp = 1\n')
        with open(plans["2 stages, 4 microbatches"], "w") as f:
            f.write('[plan]\nobjective = "iteration"\nschedule = "1f1b"\nmicrobatch_size = 16\nmicrobatches = 4\n'
                    '[[stage]]\nfirst_layer = 0\nlast_layer = 1\ndevices = ["cpu0"]\ntp = 1\n'
                    '[[stage]]\nfirst_layer = 2\nlast_layer = 3\ndevices = ["cpu1"]\ntp = 1\n')
        for optimizer, lr in (("sgd", 0.1), ("adam", 0.01)):
            expected = torch_losses(seed, iterations, global_batch, dataset_batches, optimizer, lr)
            for name, plan in plans.items():
                got = dpart_losses(dpart, src, tmp, plan, optimizer, lr, seed, iterations, dataset_batches)
                worst = max(abs(a - b) / abs(b) for a, b in zip(got, expected))
                checks += 1
                ok = len(got) == len(expected) and worst <= 1e-5
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {optimizer} {name}: {len(got)} steps, loss {got[0]:.6f} -> "
                      f"{got[-1]:.6f} (PyTorch {expected[0]:.6f} -> {expected[-1]:.6f}), worst relative "
                      f"difference {worst:.2e}")
    print(f"{checks} checks, {checks - failures} passed, {failures} failed")
    return 1 if failures or not checks else 0


if __name__ == "__main__":
    sys.exit(main())
