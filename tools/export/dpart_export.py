#!/usr/bin/env python3
"""Export a PyTorch nn.Module to dpart's model.toml by tracing it with torch.fx.

Works with Debian's python3-torch (1.13, run as /usr/bin/python3) and current PyTorch: only
torch.fx.symbolic_trace and torch.fx.passes.shape_prop.ShapeProp are used.

    /usr/bin/python3 tools/export/dpart_export.py my_models.py:ResNetBlock --input-shape 3 32 32 \
        --batch 32 -o resnet-block.toml
    /usr/bin/python3 -c 'from dpart_export import export; print(export(model, torch.randn(8, 100)))'

Every call of a module or function that produces a tensor becomes one [[layer]], in the traced
(topological) order, named after the fx node, with `inputs` naming its producers where they are
not simply the previous layer (branches and joins). Modules dpart knows become their op (Linear,
Conv2d, BatchNorm2d, LayerNorm, ReLU/GELU/SiLU, Dropout, MaxPool2d/AvgPool2d, AdaptiveAvgPool2d to
1x1, Flatten and view/flatten to one dimension, Embedding, add, cat); anything else becomes a
`custom` layer carrying its parameters, its traced output shape and no FLOPs (a warning names it).
The parameter count is exact: each parameter is counted once, where it is first used, so the
exported model's parameters equal sum(p.numel() for p in model.parameters()) for every module
whose parameters all take part in forward (the script checks it and fails otherwise).
Shapes in model.toml are per sample: the traced batch dimension is dropped.

Exit status: 0 written, 2 bad input (an unknown module spec, a shape the module rejects, a
parameter count that does not add up), with a message on stderr.
"""
import argparse
import importlib
import importlib.util
import math
import operator
import os
import sys
import tempfile

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}


class ExportError(Exception):
    """Bad input: exit status 2."""


def _toml_string(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def _shape(node):
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return [int(d) for d in meta.shape]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _square(v):
    """An int, or a pair of equal ints, as one int; None otherwise."""
    a, b = _pair(v)
    return a if a == b else None


def _is_tensor_node(node):
    return _shape(node) is not None


class _Exporter:
    def __init__(self, module, example, name, dtype, global_batch, loss):
        self.module = module
        self.example = example
        self.name = name
        self.dtype = dtype
        self.global_batch = global_batch
        self.loss = loss
        self.layers = []          # (name, dict of keys, comment)
        self.produced = {}        # fx node -> layer name that holds its value
        self.counted = set()      # id() of parameters already counted
        self.warnings = []

    # -- parameters -------------------------------------------------------------------------
    def _own_params(self, mod):
        """Parameters of `mod` not yet counted; marks them counted. Returns (count, all new)."""
        total, fresh = 0, True
        for p in mod.parameters():
            if id(p) in self.counted:
                fresh = False
                continue
            self.counted.add(id(p))
            total += p.numel()
        return total, fresh

    # -- layers -------------------------------------------------------------------------------
    def _add(self, node, inputs, keys, comment=""):
        name = node.name
        layer = {"name": name}
        prev = self.layers[-1][0] if self.layers else None
        if inputs and not (len(inputs) == 1 and inputs[0] == prev):
            layer["inputs"] = list(inputs)
        layer.update(keys)
        self.layers.append((name, layer, comment))
        self.produced[node] = name

    def _custom(self, node, inputs, params, why):
        shape = _shape(node)[1:]
        keys = {"op": "custom", "fwd_flops": 0, "bwd_flops": 0, "params": params}
        if shape:
            keys["out_shape"] = shape
        else:
            keys["out_bytes"] = DTYPES[self.dtype]
        self.warnings.append(f"{node.name}: {why}: exported as a custom layer with no FLOPs")
        self._add(node, inputs, keys, why)

    def _tensor_inputs(self, node):
        """Layer names of the tensor-valued nodes this node reads, in argument order."""
        names = []
        for arg in node.all_input_nodes:
            if arg in self.produced and self.produced[arg] not in names:
                names.append(self.produced[arg])
        return names

    def _module(self, node, inputs):
        mod = self.module.get_submodule(node.target)
        params, fresh = self._own_params(mod)
        in_shape = _shape(node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node) else None
        t = type(mod)
        if not fresh:
            # A module called a second time: its weights are already counted.
            return self._custom(node, inputs, params, f"{t.__name__} {node.target} reused (weights shared)")
        if t is torch.nn.Linear:
            return self._add(node, inputs, {"op": "linear", "in_features": mod.in_features,
                                            "out_features": mod.out_features, "bias": mod.bias is not None})
        if t is torch.nn.Conv2d:
            stride, padding = _square(mod.stride), _square(mod.padding) if not isinstance(mod.padding, str) else None
            if stride is not None and padding is not None and _square(mod.dilation) == 1:
                return self._add(node, inputs, {
                    "op": "conv2d", "in_channels": mod.in_channels, "out_channels": mod.out_channels,
                    "kernel": list(_pair(mod.kernel_size)), "stride": stride, "padding": padding,
                    "groups": mod.groups, "bias": mod.bias is not None})
        if t is torch.nn.BatchNorm2d and mod.affine:
            return self._add(node, inputs, {"op": "batchnorm", "features": mod.num_features})
        if t is torch.nn.LayerNorm and mod.elementwise_affine and len(mod.normalized_shape) == 1:
            has_bias = getattr(mod, "bias", None) is not None
            return self._add(node, inputs, {"op": "layernorm", "features": mod.normalized_shape[0], "bias": has_bias})
        simple = {torch.nn.ReLU: "relu", torch.nn.GELU: "gelu", torch.nn.SiLU: "silu", torch.nn.Dropout: "dropout"}
        if t in simple:
            return self._add(node, inputs, {"op": simple[t]})
        if t in (torch.nn.MaxPool2d, torch.nn.AvgPool2d):
            kernel, stride = _square(mod.kernel_size), _square(mod.stride if mod.stride is not None else mod.kernel_size)
            padding = _square(mod.padding)
            dilation_ok = t is torch.nn.AvgPool2d or _square(mod.dilation) == 1
            if kernel and stride and padding is not None and dilation_ok and not mod.ceil_mode:
                return self._add(node, inputs, {"op": "pool", "kind": "max" if t is torch.nn.MaxPool2d else "avg",
                                                "kernel": kernel, "stride": stride, "padding": padding})
        if t is torch.nn.AdaptiveAvgPool2d and _pair(mod.output_size) == (1, 1):
            return self._add(node, inputs, {"op": "pool", "kind": "avg", "global": True})
        if t is torch.nn.Flatten and in_shape is not None and mod.start_dim == 1 and mod.end_dim == -1:
            return self._add(node, inputs, {"op": "flatten"})
        if t is torch.nn.Embedding:
            return self._add(node, inputs, {"op": "embedding", "vocab": mod.num_embeddings,
                                            "hidden": mod.embedding_dim})
        if t is torch.nn.Identity:
            return self._custom(node, inputs, params, "Identity")
        return self._custom(node, inputs, params, f"module {t.__name__} ({node.target}) has no dpart op")

    def _function(self, node, inputs):
        target = node.target
        name = getattr(target, "__name__", str(target))
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node) and _is_tensor_node(a)]
        out = _shape(node)
        params = 0
        for a in node.all_input_nodes:
            if a.op == "get_attr":  # a bare parameter used in forward: counted here
                value = self.module
                for part in a.target.split("."):
                    value = getattr(value, part)
                if isinstance(value, torch.nn.Parameter) and id(value) not in self.counted:
                    self.counted.add(id(value))
                    params += value.numel()
        if params:
            return self._custom(node, inputs, params, f"{name} on a parameter")
        if target in (operator.add, torch.add) and len(tensor_args) == 2 and \
                _shape(tensor_args[0]) == _shape(tensor_args[1]) == out:
            return self._add(node, inputs, {"op": "add"})
        if target in (torch.relu, torch.nn.functional.relu):
            return self._add(node, inputs, {"op": "relu"})
        if target is torch.nn.functional.gelu:
            return self._add(node, inputs, {"op": "gelu"})
        if target is torch.nn.functional.silu:
            return self._add(node, inputs, {"op": "silu"})
        if target is torch.cat and len(inputs) >= 2:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim < 0:
                dim += len(out)
            if dim >= 1:
                return self._add(node, inputs, {"op": "concat", "axis": dim - 1})
        if target is torch.flatten and len(out) == 2 and len(tensor_args) == 1:
            return self._add(node, inputs, {"op": "flatten"})
        return self._custom(node, inputs, 0, f"function {name} has no dpart op")

    def _method(self, node, inputs):
        out = _shape(node)
        source = _shape(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
        if node.target in ("view", "reshape", "flatten") and out is not None and len(out) == 2 and source and \
                out[0] == source[0] and out[1] == math.prod(source[1:]):
            return self._add(node, inputs, {"op": "flatten"})
        if node.target in ("relu", "relu_"):
            return self._add(node, inputs, {"op": "relu"})
        if node.target in ("add", "add_") and len([a for a in node.args if isinstance(a, torch.fx.Node)]) == 2:
            return self._add(node, inputs, {"op": "add"})
        return self._custom(node, inputs, 0, f"method {node.target} has no dpart op")

    def run(self):
        try:
            traced = torch.fx.symbolic_trace(self.module)
        except Exception as e:  # torch raises many kinds for untraceable control flow
            raise ExportError(f"torch.fx cannot trace the module: {e}") from e
        try:
            ShapeProp(traced).propagate(self.example)
        except Exception as e:
            raise ExportError(f"the module rejects an input of shape {list(self.example.shape)}: {e}") from e
        nodes = list(traced.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ExportError(f"dpart models take one input; forward takes {len(placeholders)}")
        placeholder = placeholders[0]
        # dpart's first layer reads the model input and no other layer can: when several nodes
        # read the input, a zero-cost custom layer stands for it.
        readers = [u for u in placeholder.users if _is_tensor_node(u)]
        if len(readers) > 1:
            shape = _shape(placeholder)[1:]
            self.layers.append(("input", {"name": "input", "op": "custom", "fwd_flops": 0, "bwd_flops": 0,
                                          "params": 0, "out_shape": shape}, "the model input, read by several layers"))
            self.produced[placeholder] = "input"
        for node in nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if not _is_tensor_node(node):
                continue  # sizes and other Python values fold into their consumers
            inputs = self._tensor_inputs(node)
            if not inputs and self.layers:
                raise ExportError(f"{node.name} reads no tensor of the model: dpart layers read the model input or "
                                  "other layers")
            if node.op == "call_module":
                self._module(node, inputs)
            elif node.op == "call_function":
                self._function(node, inputs)
            elif node.op == "call_method":
                self._method(node, inputs)
        if self.loss:
            out_node = [n for n in nodes if n.op == "output"][0]
            last = out_node.all_input_nodes[0] if out_node.all_input_nodes else None
            prev = self.layers[-1][0]
            entry = {"name": "loss", "op": "softmax_xent"}
            if last is not None and last in self.produced and self.produced[last] != prev:
                entry["inputs"] = [self.produced[last]]
            self.layers.append(("loss", entry, ""))
        expected = sum(p.numel() for p in self.module.parameters())
        exported = sum(layer.get("params", 0) for _, layer, _ in self.layers if layer.get("op") == "custom")
        exported += self._op_params()
        if exported != expected:
            raise ExportError(f"exported {exported} parameters but the module has {expected}: some parameters take "
                              "no part in forward")
        return self._toml(expected)

    def _op_params(self):
        """Parameters the dpart ops will count (the same formulas as src/graph/ops.cpp)."""
        total = 0
        for _, layer, _ in self.layers:
            op = layer["op"]
            if op == "linear":
                total += layer["in_features"] * layer["out_features"] + (layer["out_features"] if layer["bias"] else 0)
            elif op == "conv2d":
                kh, kw = layer["kernel"]
                total += layer["out_channels"] * layer["in_channels"] // layer["groups"] * kh * kw
                total += layer["out_channels"] if layer["bias"] else 0
            elif op == "batchnorm":
                total += 2 * layer["features"]
            elif op == "layernorm":
                total += (2 if layer["bias"] else 1) * layer["features"]
            elif op == "embedding":
                total += layer["vocab"] * layer["hidden"]
        return total

    def _toml(self, params):
        input_shape = list(self.example.shape[1:])
        lines = [
            f"# Exported from a PyTorch module by tools/export/dpart_export.py (torch {torch.__version__}, torch.fx).",
            f"# parameters: {params:,} (= sum(p.numel() for p in model.parameters()))",
        ]
        lines += [f"# note: {w}" for w in self.warnings]
        lines += ["", "[model]", f"name = {_toml_string(self.name)}", f"dtype = {_toml_string(self.dtype)}",
                  f"global_batch = {self.global_batch}", f"input_shape = {_toml_value(input_shape)}"]
        for _, layer, comment in self.layers:
            lines += ["", "[[layer]]" + (f"  # {comment}" if comment else "")]
            lines += [f"{k} = {_toml_value(v)}" for k, v in layer.items()]
        return "\n".join(lines) + "\n"


def export(module, example, name="model", dtype="fp32", global_batch=None, loss=False):
    """model.toml text for `module` traced on `example` (a batch: its first dimension is dropped)."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    module = module.eval()
    with torch.no_grad():
        return _Exporter(module, example, name, dtype, global_batch or example.shape[0], loss).run()


def _load(spec):
    """'path/to/file.py:Name' or 'package.module:Name'; Name is a class or a factory, called with no arguments."""
    if ":" not in spec:
        raise ExportError(f"module spec {spec!r}: expected FILE.py:NAME or MODULE:NAME")
    where, attr = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            loader_spec = importlib.util.spec_from_file_location("dpart_export_user", where)
            if loader_spec is None or not os.path.exists(where):
                raise ExportError(f"{where}: no such file")
            mod = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(where)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"{where}: cannot import: {e}") from e
    if not hasattr(mod, attr):
        raise ExportError(f"{where} has no {attr!r}")
    made = getattr(mod, attr)()
    if not isinstance(made, torch.nn.Module):
        raise ExportError(f"{spec} made a {type(made).__name__}, not an nn.Module")
    return made


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export an nn.Module to dpart's model.toml with torch.fx.")
    parser.add_argument("module", help="FILE.py:NAME or MODULE:NAME: a class or factory called with no arguments")
    parser.add_argument("--input-shape", type=int, nargs="+", required=True,
                        help="per-sample input shape, e.g. 3 32 32 (the batch dimension is added)")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the traced example input (2)")
    parser.add_argument("--global-batch", type=int, default=None, help="[model] global_batch (default: --batch)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="[model] dtype (fp32)")
    parser.add_argument("--name", default=None, help="[model] name (default: NAME of the module spec)")
    parser.add_argument("--loss", action="store_true", help="append a softmax_xent loss on the output")
    parser.add_argument("-o", "--out", default=None, help="write here (atomically); default: standard output")
    args = parser.parse_args(argv)
    try:
        if args.batch < 1 or any(d < 1 for d in args.input_shape):
            raise ExportError("--batch and --input-shape must be positive")
        module = _load(args.module)
        example = torch.randn(args.batch, *args.input_shape)
        text = export(module, example, args.name or args.module.rsplit(":", 1)[1], args.dtype, args.global_batch,
                      args.loss)
    except ExportError as e:
        print(f"dpart_export: error: {e}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
        return 0
    directory = os.path.dirname(os.path.abspath(args.out))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".dpart_export.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
