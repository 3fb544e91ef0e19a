"""Per-kernel summary of an Nsight Compute source-page export: opcode mix, hot loops, top stalls.

Command (on the GPU machine, after `ncu --set full --import-source yes -o rep ...`):

    ncu -i rep.ncu-rep --page source --csv --print-source sass > source.csv
    python3 bench/ncu_summary.py source.csv > bench/results/attention-ncu-h200-8k.txt

For each kernel of the export: the share of executed warp instructions and of warp-stall
samples by opcode; the basic blocks (runs of instructions with one execution count) that hold
most of the work, with their length (instructions per iteration per warp) and opcode mix; and
the instructions with the most stall samples, with their top stall reasons.
"""
from __future__ import annotations

import argparse
import collections
import csv
import io


def kernels(text: str):
    """(kernel name, rows of the source table) for each kernel of the export."""
    for part in text.split('"Kernel Name",')[1:]:
        name = part.split(",")[0].strip('"')
        yield name, list(csv.DictReader(io.StringIO(part.split("\n", 1)[1])))


def _n(row, key):
    return int(row.get(key) or 0)


def _op(src: str) -> str:
    words = src.split()
    if not words:
        return ""
    return (words[1] if words[0].startswith("@") and len(words) > 1 else words[0])


def summary(name, rows, top_blocks=8, top_stalls=15):
    ex_key, st_key = "Instructions Executed", "Warp Stall Sampling (All Samples)"
    tot = sum(_n(r, ex_key) for r in rows) or 1
    stt = sum(_n(r, st_key) for r in rows) or 1
    print(f"== {name}: {tot} warp instructions, {stt} stall samples")
    ex, st = collections.Counter(), collections.Counter()
    for r in rows:
        op = _op(r["Source"]).split(".")[0]
        ex[op] += _n(r, ex_key)
        st[op] += _n(r, st_key)
    print("opcode      exec%  stall%")
    for op, n in ex.most_common(20):
        print(f"{op:10s} {n / tot * 100:5.1f}  {st[op] / stt * 100:5.1f}")
    blocks, cur = [], None
    for i, r in enumerate(rows):
        n = _n(r, ex_key)
        if cur is None or cur["n"] != n:
            cur = {"start": i, "n": n, "len": 0, "s": 0, "ops": collections.Counter()}
            blocks.append(cur)
        cur["len"] += 1
        cur["s"] += _n(r, st_key)
        cur["ops"][_op(r["Source"])] += 1
    print("hot blocks (rows, executions per instruction, instructions, exec%, stall%, mix)")
    for b in sorted(sorted(blocks, key=lambda b: -b["n"] * b["len"])[:top_blocks],
                    key=lambda b: b["start"]):
        print(f"  {b['start']}-{b['start'] + b['len'] - 1} {b['n']} {b['len']} "
              f"{b['n'] * b['len'] / tot * 100:.1f} {b['s'] / stt * 100:.1f} "
              f"{dict(b['ops'].most_common(6))}")
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    print("most stalled instructions (row, stall%, instruction, top reasons)")
    for i in sorted(sorted(range(len(rows)), key=lambda i: -_n(rows[i], st_key))[:top_stalls]):
        r = rows[i]
        why = sorted(((_n(r, k), k[6:]) for k in reasons), reverse=True)[:3]
        print(f"  {i} {_n(r, st_key) / stt * 100:.2f} {r['Source'].strip()[:70]} {why}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source_csv", help="the source page exported by `ncu -i REP --page source "
                                       "--csv --print-source sass`")
    args = ap.parse_args(argv)
    with open(args.source_csv) as f:
        text = f.read()
    for name, rows in kernels(text):
        summary(name, rows)


if __name__ == "__main__":
    main()
