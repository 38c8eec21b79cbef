#!/usr/bin/python3
"""Plot columns of CSV files written by dpart (e.g. `dpart inspect --csv`).

    /usr/bin/python3 tools/plot/plot_csv.py FILE.csv [FILE.csv ...] --x COLUMN --y COLUMN
        [--y COLUMN ...] [--kind bar|line] [--log] [--title T] -o out.png

One series is drawn per file and per --y column; the legend names the file (and the column
when there are several). The --x column may hold text (layer names, for example: the points
are then placed in order of first appearance) or numbers; every --y value must be a finite
number. A missing file or column, or a --y value that is not a number, is reported with the
file name (and line and column) and the script exits with status 2.

Standard library and matplotlib only (Debian: python3-matplotlib, reached via /usr/bin/python3).
"""

import argparse
import csv
import math
import os
import sys

PROG = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "plot_csv.py"


class InputError(Exception):
    """A problem with an input file; reported on stderr, exit status 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Plot columns of one or more CSV files written by dpart.",
        epilog="example: %(prog)s layers.csv --x name --y fwd_flops --y bwd_flops "
               "--kind bar --log -o flops.png",
    )
    p.add_argument("files", nargs="+", metavar="FILE.csv", help="CSV file(s) with a header row")
    p.add_argument("--x", required=True, metavar="COLUMN",
                   help="column for the x axis (numbers, or text such as layer names)")
    p.add_argument("--y", required=True, action="append", metavar="COLUMN",
                   help="column to plot on the y axis (numeric); repeat for several")
    p.add_argument("--kind", choices=("bar", "line"), default="line",
                   help="bar or line chart (default: line)")
    p.add_argument("--log", action="store_true", help="logarithmic y axis")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png",
                   help="output image (format from the extension: png, svg, pdf, ...)")
    p.add_argument("--title", metavar="T", help="chart title")
    return p.parse_args(argv)


def parse_number(text):
    """float(text) for a finite number, else None."""
    try:
        v = float(text.strip())
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def read_csv(path, xcol, ycols):
    """Return (xs as strings, xs as floats or None, {ycol: [floats]}) for one file."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")  # a byte-order mark is not part of a column name
    except OSError as e:
        raise InputError(f"{path}: cannot open: {e.strerror}")
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise InputError(f"{path}: empty file (expected a header row)")
            header = [h.strip() for h in header]
            index = {}
            for i, h in enumerate(header):
                index.setdefault(h, i)
            for col in [xcol] + ycols:
                if col not in index:
                    raise InputError(f"{path}: no column '{col}' (columns: {', '.join(header)})")
            xs, ys = [], {c: [] for c in ycols}
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue  # blank line
                if len(row) != len(header):
                    raise InputError(f"{path}:{line}: {len(row)} fields, header has {len(header)}")
                xs.append(row[index[xcol]].strip())
                for c in ycols:
                    v = parse_number(row[index[c]])
                    if v is None:
                        raise InputError(f"{path}:{line}: column '{c}': "
                                         f"'{row[index[c]]}' is not a number")
                    ys[c].append(v)
        except csv.Error as e:
            raise InputError(f"{path}:{reader.line_num}: malformed CSV: {e}")
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text")
    if not xs:
        raise InputError(f"{path}: no data rows")
    xnum = [parse_number(x) for x in xs]
    return xs, (xnum if all(v is not None for v in xnum) else None), ys


def series_labels(files, ycols):
    names = [os.path.basename(f) for f in files]
    if len(set(names)) != len(names):  # same base name in different folders
        names = list(files)
    labels = {}
    for f, n in zip(files, names):
        for c in ycols:
            labels[(f, c)] = n if len(ycols) == 1 else f"{n}: {c}"
    return labels


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        data = {f: read_csv(f, args.x, args.y) for f in args.files}
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # x positions: numeric when every file's x column is numeric, else categories in order of
    # first appearance over all files.
    numeric_x = all(xnum is not None for _, xnum, _ in data.values())
    categories = []
    if not numeric_x:
        seen = set()
        for xs, _, _ in data.values():
            for x in xs:
                if x not in seen:
                    seen.add(x)
                    categories.append(x)
        cat_pos = {c: i for i, c in enumerate(categories)}

    labels = series_labels(args.files, args.y)
    n_series = len(args.files) * len(args.y)
    width_in = 8.0
    if categories:
        width_in = min(40.0, max(8.0, 0.25 * len(categories) * max(1, n_series if args.kind == "bar" else 1)))
    fig, ax = plt.subplots(figsize=(width_in, 5.0))

    if numeric_x and args.kind == "bar":
        allx = sorted({v for _, xnum, _ in data.values() for v in xnum})
        gaps = [b - a for a, b in zip(allx, allx[1:]) if b > a]
        slot = min(gaps) if gaps else 1.0
    else:
        slot = 1.0
    bar_w = 0.8 * slot / n_series

    nonpositive = []
    k = 0
    for f in args.files:
        xs, xnum, ys = data[f]
        pos = xnum if numeric_x else [cat_pos[x] for x in xs]
        for c in args.y:
            vals = ys[c]
            if args.log and any(v <= 0 for v in vals):
                nonpositive.append(f"{f} column '{c}'")
            if args.kind == "bar":
                off = (k - (n_series - 1) / 2.0) * bar_w
                ax.bar([p + off for p in pos], vals, width=bar_w, label=labels[(f, c)])
            else:
                ax.plot(pos, vals, marker="o", markersize=3, label=labels[(f, c)])
            k += 1

    if not numeric_x:
        ax.set_xticks(range(len(categories)))
        rotate = len(categories) > 8 or max(len(c) for c in categories) > 10
        ax.set_xticklabels(categories, rotation=90 if rotate else 0, fontsize=8 if rotate else None)
    elif all(v == int(v) for _, xnum, _ in data.values() for v in xnum):
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if args.log:
        ax.set_yscale("log")
        for what in nonpositive:
            print(f"{PROG}: warning: {what} has values <= 0; they are not shown on a log axis",
                  file=sys.stderr)
    ax.set_xlabel(args.x)
    ax.set_ylabel(", ".join(args.y))
    if args.title:
        ax.set_title(args.title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    # matplotlib names a file without an extension .png; the temporary name keeps the extension,
    # which tells it the format, and the plot appears whole or not at all.
    output = args.output if os.path.splitext(args.output)[1] else args.output + ".png"
    base, ext = os.path.splitext(output)
    tmp = f"{base}.tmp.{os.getpid()}{ext}"
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, output)
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: cannot write {output}: {e}", file=sys.stderr)
        if os.path.exists(tmp):
            os.remove(tmp)
        return 2
    finally:
        plt.close(fig)
    print(f"wrote {output} ({n_series} series)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
