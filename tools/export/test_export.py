#!/usr/bin/env python3
"""tools/export round trip, run by ctest: modules exported with torch.fx keep their exact parameter
count, and `dpart inspect` and `dpart plan` accept the files as they are.

Usage: /usr/bin/python3 tools/export/test_export.py DPART SOURCE_DIR
"""
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dpart_export  # noqa: E402


class OriginMlp(torch.nn.Module):
    """The project's origin model: Linear 100->50, ReLU, Linear 50->10."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(100, 50)
        self.relu = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(50, 10)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


class ResidualCnn(torch.nn.Module):
    """A small CNN with a residual branch: conv-bn-relu, then conv-bn-relu-conv-bn + shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = torch.nn.BatchNorm2d(16)
        self.conv1 = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.pool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = torch.relu(x + y)
        x = self.pool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


class Odd(torch.nn.Module):
    """A module dpart has no op for (a GRU cell on a flat input), a shared layer, the input read twice."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(8, 8)
        self.cell = torch.nn.GRUCell(8, 8)

    def forward(self, x):
        h = self.shared(x)
        h = self.shared(h)
        return torch.cat([self.cell(h), x], dim=1)


passed = failed = 0


def check(name, condition, detail=""):
    global passed, failed
    if condition:
        passed += 1
    else:
        failed += 1
        print(f"FAIL {name}" + (f": {detail}" if detail else ""))


def run(*args):
    return subprocess.run(list(args), capture_output=True, text=True)


def inspect_params(dpart, path, tmp):
    """The parameter total of `dpart inspect --csv`, or None when dpart rejects the file."""
    csv = os.path.join(tmp, "layers.csv")
    r = run(dpart, "inspect", "-q", path, "--csv", csv)
    if r.returncode != 0:
        print(r.stderr)
        return None
    with open(csv) as f:
        rows = f.read().splitlines()[1:]
    return sum(int(row.split(",")[3]) for row in rows)


def main():
    dpart, src = sys.argv[1], sys.argv[2]
    cluster = os.path.join(src, "plans", "clusters", "cpu-local.toml")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("origin-mlp", OriginMlp(), torch.randn(4, 100), True),
                 ("residual-cnn", ResidualCnn(), torch.randn(4, 3, 32, 32), True),
                 ("odd", Odd(), torch.randn(4, 8), False)]
        for name, module, example, loss in cases:
            expected = sum(p.numel() for p in module.parameters())
            text = dpart_export.export(module, example, name=name, global_batch=32, loss=loss)
            path = os.path.join(tmp, name + ".toml")
            with open(path, "w") as f:
                f.write(text)
            got = inspect_params(dpart, path, tmp)
            check(f"{name}: dpart inspect accepts it", got is not None)
            check(f"{name}: parameters", got == expected, f"dpart counts {got}, torch {expected}")
            r = run(dpart, "plan", path, "-c", cluster, "-q")
            check(f"{name}: dpart plan accepts it", r.returncode == 0, r.stderr.strip())

        # The origin model, layer for layer.
        text = dpart_export.export(OriginMlp(), torch.randn(2, 100), name="origin", loss=True)
        check("origin: layers", [l for l in text.splitlines() if l.startswith("op = ")] ==
              ['op = "linear"', 'op = "relu"', 'op = "linear"', 'op = "softmax_xent"'], text)
        check("origin: 5,560 parameters", "# parameters: 5,560" in text, text)
        # The residual branch: the join names both of its inputs.
        text = dpart_export.export(ResidualCnn(), torch.randn(2, 3, 32, 32))
        check("cnn: the add reads both branches", 'inputs = ["relu", "bn2"]' in text, text)
        check("cnn: view(x.size(0), -1) is a flatten", 'op = "flatten"' in text, text)
        check("cnn: global average pool", "global = true" in text, text)
        # What dpart has no op for is a custom layer, named in a note; shared weights count once;
        # an input read twice gets a stand-in layer.
        text = dpart_export.export(Odd(), torch.randn(2, 8))
        check("odd: GRUCell is custom", "note: cell: module GRUCell (cell) has no dpart op" in text, text)
        check("odd: shared Linear counted once", "reused (weights shared)" in text, text)
        check("odd: input stand-in", 'name = "input"' in text, text)
        check("odd: concat along features", 'op = "concat"' in text and "axis = 0" in text, text)

        # The command line: a module spec, the file written, bad specs refused with exit 2.
        spec_file = os.path.join(tmp, "mymodels.py")
        with open(spec_file, "w") as f:
            f.write("import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(100, 50), "
                    "torch.nn.ReLU(), torch.nn.Linear(50, 10))\n")
        out = os.path.join(tmp, "cli.toml")
        script = os.path.join(src, "tools", "export", "dpart_export.py")
        r = run(sys.executable, script, spec_file + ":make", "--input-shape", "100", "--batch", "8", "-o", out)
        check("cli: exit 0", r.returncode == 0, r.stderr)
        check("cli: dpart accepts the file", inspect_params(dpart, out, tmp) == 5560)
        r = run(sys.executable, script, spec_file + ":nothing", "--input-shape", "100")
        check("cli: unknown name is exit 2", r.returncode == 2 and "has no 'nothing'" in r.stderr, r.stderr)
        r = run(sys.executable, script, spec_file + ":make", "--input-shape", "7")
        check("cli: a wrong input shape is exit 2", r.returncode == 2 and "rejects an input of shape [2, 7]" in r.stderr,
              r.stderr)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
