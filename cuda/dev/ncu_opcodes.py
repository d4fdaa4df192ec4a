"""Warp-stall samples of an ncu report's SASS source page summed by opcode (dev; run where ncu
is), so that where a kernel's time goes (its main loop, its epilogue's stores or math) reads
in a few lines:
  ncu -i rep.ncu-rep --page source --csv --print-source sass | python3 cuda/dev/ncu_opcodes.py [N]
For each table (one per kernel and pass): the N opcodes with the most samples, their share,
and the executed warp instructions of each.
"""
import csv
import re
import sys
from collections import defaultdict


def opcode(src):
    s = re.sub(r"^@!?U?P\w+\s+", "", src.strip())  # predicate
    return s.split(" ")[0] if s else "?"


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 25
    head, tables = None, []
    for r in csv.reader(sys.stdin):
        if not r:
            continue
        if "Source" in r and any("Sampl" in c for c in r):
            head = r
            tables.append(defaultdict(lambda: [0, 0]))
            continue
        if head is None or len(r) != len(head):
            continue
        src = r[head.index("Source")]
        samp = next((i for i, c in enumerate(head) if "Sampling (All" in c), None)
        ex = next((i for i, c in enumerate(head) if c == "Instructions Executed"), None)
        try:
            s = int(r[samp]) if samp is not None and r[samp] else 0
            e = int(r[ex]) if ex is not None and r[ex] else 0
        except ValueError:
            continue
        a = tables[-1][opcode(src)]
        a[0] += s
        a[1] += e
    for k, t in enumerate(tables):
        tot = sum(v[0] for v in t.values()) or 1
        print(f"=== table {k}: {tot} samples")
        for op, (s, e) in sorted(t.items(), key=lambda kv: -kv[1][0])[:n]:
            print(f"{op:<28} {s:>8} {100 * s / tot:6.1f}%  executed {e}")


if __name__ == "__main__":
    main()
