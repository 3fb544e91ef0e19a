"""The shipped kernels' machine code for Hopper, read without a GPU: size, loops, spills.

Compiles the attention forward and backward (the 1.1B flavor's D=64, GQA group 3, causal, noisy,
256 levels, their GPU tile configurations) and the linear's operand pass (its table entry for
K >= 256, unit-stride operands, 16-byte aligned pointers, as the launches specialise them) for
sm_90 with the ptxas that ships with Triton, disassembles them with Triton's nvdisasm, and
reports per kernel: registers, local-memory stack, SASS instructions, and for each loop (a
backward branch) its length and opcode mix, local loads/stores (spills) included. Counts of
static code, not times: the GPU decides (bench/attention_parts.py, bench/linear.py).

    python3 bench/kernel_sass.py --out bench/results/kernel-sass-sm90-triton3.9.txt
    # the GPU host's Triton, beside the installed one:
    #   python3 -m pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python3 bench/kernel_sass.py \
        --out bench/results/kernel-sass-sm90-triton3.6.txt
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from noise_layouts import (backward_kernel_source, forward_kernel_source,  # noqa: E402
                           operand_pass_source, write_report)

# opcodes reported per loop, in this order
OPCODES = ("LDL", "STL", "HGMMA", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "IMAD",
           "LOP3", "SHF", "IADD3", "PRMT", "STS", "LDS", "SHFL", "BAR", "LDG", "STG", "LDGSTS")


def parse_sass(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """(instructions, loops) of nvdisasm's text: the instruction strings in address order and,
    for each branch back to an earlier label, the (first, last) instruction index of the loop
    it closes."""
    ins: list[str] = []
    labels: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;?\s*$", line)
        if m:
            ins.append(m.group(1))
    loops = []
    for i, t in enumerate(ins):
        m = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", t)
        if m and labels.get(m.group(1), i + 1) <= i:
            loops.append((labels[m.group(1)], i))
    return ins, loops


def opcode(instruction: str) -> str:
    """The opcode of one instruction, predicate and modifiers stripped (`@!P0 LDL.64` -> LDL)."""
    t = re.sub(r"^@!?U?P\w+\s+", "", instruction)
    m = re.match(r"([A-Z][A-Z0-9_]*)", t)
    return m.group(1) if m else "?"


def describe(ins: list[str], loops: list[tuple[int, int]], min_len: int = 40) -> list[str]:
    """One line per loop of at least `min_len` instructions: its span, length and opcode mix."""
    lines = []
    for first, last in sorted(loops):
        if last - first + 1 < min_len:
            continue
        ops = collections.Counter(opcode(t) for t in ins[first:last + 1])
        mix = ", ".join(f"{k} {ops[k]}" for k in OPCODES if ops[k])
        lines.append(f"  loop [{first}, {last}], {last - first + 1} instructions: {mix}")
    return lines


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def inspect(name: str, src, options: dict) -> list[str]:
    """The report's lines for one kernel, compiled for sm_90 with `options`."""
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True,
                              text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", res)
    regs, stack = m.groups() if m else ("?", "?")
    ins, loops = parse_sass(sass)
    ops = collections.Counter(opcode(t) for t in ins)
    head = (f"{name}: {regs} registers, {stack} bytes of stack, {len(ins)} SASS instructions "
            f"(LDL {ops['LDL']}, STL {ops['STL']})")
    return [head, *describe(ins, loops)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    lines = [f"triton {triton.__version__}, sm_90"]
    for name, make in (("attention forward", forward_kernel_source),
                       ("attention backward (dK/dV, dQ atomics), GQA group 3",
                        backward_kernel_source),
                       ("linear operand pass", operand_pass_source)):
        src, options, tiles = make()
        lines += inspect(f"{name}, {tiles}", src, options)
    write_report(lines, a.out)


if __name__ == "__main__":
    main()
