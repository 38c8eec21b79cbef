#!/usr/bin/python3
"""Plots of dpart's trace files (Debian's matplotlib: run with /usr/bin/python3).

    dpart_plot.py iterations RUN [RUN ...] -o iterations.png   iteration time over iterations,
                                                                repartitions and failures marked
    dpart_plot.py gantt TIMELINE.csv [--iteration N] -o gantt.png   one iteration's tasks per stage
    dpart_plot.py compare COMPARE.csv -o compare.png            mean iteration time and speedup per run

RUN is a directory holding iterations.csv (as `dpart replay --out-dir` writes) or the CSV itself.
A missing file or column, or a value that is not a number, is reported with the file and line,
and the script exits with status 2.
"""

import argparse
import csv
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class InputError(Exception):
    pass


def read(path, columns):
    # utf-8-sig: a byte-order mark, as some editors write one, is not part of the first column's name.
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = list(reader)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text")
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: malformed CSV: {e}")
    if not rows:
        raise InputError(f"{path}: empty file")
    header = rows[0]
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(f"{path}:1: missing column(s) {', '.join(missing)}")
    index = {c: header.index(c) for c in header}
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise InputError(f"{path}:{n}: {len(row)} cells for {len(header)} columns")
        out.append((n, {c: row[index[c]] for c in header}))
    return out


def number(path, line, row, column):
    try:
        v = float(row[column])
    except ValueError:
        raise InputError(f'{path}:{line}: column "{column}": "{row[column]}" is not a number')
    if not math.isfinite(v):
        raise InputError(f'{path}:{line}: column "{column}": "{row[column]}" is not finite')
    return v


def run_path(arg):
    path = os.path.join(arg, "iterations.csv") if os.path.isdir(arg) else arg
    name = os.path.basename(os.path.normpath(arg if os.path.isdir(arg) else os.path.dirname(arg) or arg))
    return path, name


def plot_iterations(args):
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for arg in args.runs:
        path, name = run_path(arg)
        rows = read(path, ["iteration", "plan_version", "iteration_ms", "event"])
        xs = [number(path, n, r, "iteration") for n, r in rows]
        ys = [number(path, n, r, "iteration_ms") / 1e3 for n, r in rows]
        (line,) = ax.plot(xs, ys, label=name, linewidth=1.5)
        for (n, r), x, y in zip(rows, xs, ys):
            event = r["event"]
            if "repartition" in event:
                ax.plot([x], [y], marker="o", color=line.get_color(), markersize=6)
            if "fail" in event:
                ax.plot([x], [y], marker="x", color="black", markersize=9)
            elif "slowdown" in event or "recover" in event or "link" in event:
                ax.axvline(x, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("iteration time (s)")
    ax.set_title(args.title or "Iteration time (dots: repartitions; dotted lines: events; x: failures)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


COLORS = {"forward": "#4c78a8", "backward": "#f58518", "send_activation": "#54a24b",
          "send_gradient": "#b7d9a8", "allreduce": "#e45756", "optimizer": "#9d755d"}


def plot_gantt(args):
    rows = read(args.timeline, ["iteration", "stage", "kind", "start_ms", "end_ms"])
    iterations = sorted({int(number(args.timeline, n, r, "iteration")) for n, r in rows})
    if not iterations:
        raise InputError(f"{args.timeline}: no tasks")
    it = args.iteration if args.iteration is not None else iterations[0]
    if it not in iterations:
        held = ", ".join(str(i) for i in iterations[:10]) + (f" and {len(iterations) - 10} more" if len(iterations) > 10 else "")
        raise InputError(f"{args.timeline}: iteration {it} is not in the file (it has {held})")
    fig, ax = plt.subplots(figsize=(11, 4))
    stages = set()
    for n, r in rows:
        if int(number(args.timeline, n, r, "iteration")) != it:
            continue
        stage = int(number(args.timeline, n, r, "stage"))
        stages.add(stage)
        start = number(args.timeline, n, r, "start_ms") / 1e3
        end = number(args.timeline, n, r, "end_ms") / 1e3
        kind = r["kind"]
        # Compute on the stage's row, transfers just below it.
        y = stage + (0.35 if kind.startswith("send") else 0)
        h = 0.25 if kind.startswith("send") else 0.6
        ax.broken_barh([(start, max(end - start, 1e-9))], (y - 0.3, h), color=COLORS.get(kind, "grey"))
    ax.set_yticks(sorted(stages))
    ax.set_yticklabels([f"stage {s}" for s in sorted(stages)])
    ax.invert_yaxis()
    ax.set_xlabel("time in the iteration (s)")
    ax.set_title(args.title or f"Iteration {it}: forward (blue), backward (orange), transfers (green), "
                                "all-reduce (red), optimizer (brown)", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    return fig


def plot_compare(args):
    rows = read(args.compare, ["run", "mean_ms", "speedup"])
    names = [r["run"] for _, r in rows]
    means = [number(args.compare, n, r, "mean_ms") / 1e3 for n, r in rows]
    speedups = [number(args.compare, n, r, "speedup") for n, r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, means, color="#4c78a8")
    for bar, s in zip(bars, speedups):
        ax.annotate(f"{s:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax.set_ylabel("mean iteration time (s)")
    ax.set_title(args.title or "Runs compared (labels: speedup over the baseline)")
    ax.grid(alpha=0.3, axis="y")
    return fig


def main(argv):
    p = argparse.ArgumentParser(prog="dpart_plot.py", description="Plots of dpart's trace files.")
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("iterations", help="iteration time over iterations, several runs")
    a.add_argument("runs", nargs="+")
    g = sub.add_parser("gantt", help="one iteration's tasks per stage, from timeline.csv")
    g.add_argument("timeline")
    g.add_argument("--iteration", type=int)
    c = sub.add_parser("compare", help="bar chart of a `dpart compare --csv` file")
    c.add_argument("compare")
    for s in (a, g, c):
        s.add_argument("-o", "--output", required=True)
        s.add_argument("--title")
    args = p.parse_args(argv)
    tmp = None
    try:
        fig = {"iterations": plot_iterations, "gantt": plot_gantt, "compare": plot_compare}[args.what](args)
        fig.tight_layout()
        base, ext = os.path.splitext(args.output)
        formats = fig.canvas.get_supported_filetypes()
        if ext[1:].lower() not in formats:
            raise InputError(f"{args.output}: name the output with one of the extensions "
                             f"{', '.join('.' + f for f in sorted(formats))}")
        # The temporary name keeps the extension, which tells matplotlib the format.
        tmp = f"{base}.tmp.{os.getpid()}{ext}"
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, args.output)  # atomic: the plot appears whole or not at all
    except InputError as e:
        print(f"dpart_plot.py: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"dpart_plot.py: error: cannot write {args.output}: {e}", file=sys.stderr)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
