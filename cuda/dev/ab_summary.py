"""Each ab_prefill.py line as ratios of the best (lowest) time of every value to the first
value's (dev only).

    python3 cuda/dev/ab_summary.py LOG...
"""
import re
import sys

for f in sys.argv[1:]:
    print(f)
    for line in open(f):
        if not line.startswith("B="):
            continue
        head = re.match(r"(B=\d+ L=\d+)", line).group(1)
        vals = re.findall(r"(\w+)=(\S+) ([\d. ]+) ms", line)
        base = None
        out = []
        for _, v, ts in vals:
            t = min(map(float, ts.split()))
            base = base or t
            out.append(f"{v}:{t / base:.3f}")
        print(f"  {head:<12} {base:7.3f} ms  " + " ".join(out))
