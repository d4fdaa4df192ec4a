import os

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("BLACKMAMBA_SHARED", os.path.join(HERE, "..", "..", "shared"))
GOLDEN = os.path.join(SHARED, "golden", "tiny-a")
DATA = os.path.join(SHARED, "data")
SANITIZED = os.environ.get("BLACKMAMBA_SANITIZED") == "1"


def rel_err(a, b):
    """‖a - b‖ / ‖b‖ in float64 (NaN if either has NaN)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture(scope="session")
def golden():
    if not os.path.exists(os.path.join(GOLDEN, "golden.npz")):
        pytest.fail(f"golden files not found at {GOLDEN} (set BLACKMAMBA_SHARED)")
    return dict(np.load(os.path.join(GOLDEN, "golden.npz")))


# Fuzz case counts (tests/test_fuzz.py fills it), printed at the end of the session.
FUZZ_REPORT = {}


def pytest_terminal_summary(terminalreporter):
    if not FUZZ_REPORT:
        return
    tr = terminalreporter
    tr.section("fuzzing")
    total = 0
    for name, r in sorted(FUZZ_REPORT.items()):
        outcomes = ", ".join(f"{k} {v}" for k, v in r.items()
                             if k not in ("target", "examples", "seed", "seconds"))
        tr.write_line(f"{name}: {r['examples']} cases in {r['seconds']} s (seed {r['seed']}): "
                      f"{outcomes}")
        total += r["examples"]
    tr.write_line(f"total: {total} fuzz cases (BLACKMAMBA_FUZZ_EXAMPLES sets cases per target)")
