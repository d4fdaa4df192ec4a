"""nvidia-smi sampling around a measurement (dev; for prefill_spread.py and sustain_probe.py):
tells a clock, power or temperature effect from one in the code.

    with smi_samples(["clocks.sm", "power.draw"]) as rows:
        ...  # the measurement
    print(span(rows, 0))  # "1395-1980"
"""
import contextlib
import math
import subprocess
import tempfile


def _num(s):
    try:
        return float(s)
    except ValueError:  # "N/A", "[Not Supported]"
        return math.nan


@contextlib.contextmanager
def smi_samples(fields, period_ms=100):
    """Samples nvidia-smi's --query-gpu `fields` every period_ms while the block runs. Yields a
    list that holds, once the block has ended, one row of floats a sample (NaN where a field
    is not a number)."""
    rows = []
    with tempfile.NamedTemporaryFile("r", suffix=".csv") as f:
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=" + ",".join(fields),
                                "--format=csv,noheader,nounits", "-lms", str(period_ms),
                                "-f", f.name], stderr=subprocess.DEVNULL)
        try:
            yield rows
        finally:
            smi.terminate()
            smi.wait()
        for line in f.read().strip().splitlines():
            parts = line.split(",")
            if len(parts) == len(fields):
                rows.append([_num(p.strip()) for p in parts])


def span(rows, i):
    """'min-max' of column i over the samples (NaN skipped), or '?'."""
    v = [r[i] for r in rows if not math.isnan(r[i])]
    return f"{min(v):.0f}-{max(v):.0f}" if v else "?"
