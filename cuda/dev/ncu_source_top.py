"""The hottest SASS lines of an ncu report's source page (dev; run where ncu is):
  ncu -i rep.ncu-rep --page source --csv --print-source sass | python3 cuda/dev/ncu_source_top.py [N]
For each table (one per kernel) prints its header's metric names once, then the N lines with
the most warp-stall samples (all columns whose name has "Sampl" or "Executed"), so the text stays
small enough to bring back from the GPU machine.
"""
import csv
import sys


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    rows = list(csv.reader(sys.stdin))
    tables, cur = [], None
    for r in rows:
        if not r:
            continue
        if any("Source" == c or "Address" == c for c in r) and any("Sampl" in c for c in r):
            cur = [r, []]
            tables.append(cur)
        elif cur is not None:
            cur[1].append(r)
        else:
            print(",".join(r))  # preamble (kernel names)
    for head, body in tables:
        keep = [i for i, c in enumerate(head) if c in ("Address", "Source") or "Sampl" in c
                or "Executed" in c]
        samp = next((i for i, c in enumerate(head) if "Sampling (All" in c),
                    next((i for i, c in enumerate(head) if "Sampl" in c), None))
        print("=== table:", " | ".join(head[i] for i in keep))

        def val(r, i):
            try:
                return float(r[i].replace(",", ""))
            except (ValueError, IndexError):
                return 0.0
        total = sum(val(r, samp) for r in body) if samp is not None else 0
        print(f"lines {len(body)}, samples {total:.0f}")
        body.sort(key=lambda r: -val(r, samp) if samp is not None else 0)
        for r in body[:n]:
            print(" | ".join(r[i] for i in keep if i < len(r)))


if __name__ == "__main__":
    main()
