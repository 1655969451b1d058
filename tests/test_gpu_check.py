"""The GPU check script stays runnable: its dry run lists every step, and its benchmark filters select rows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_dry_run_lists_every_step_within_eight_minutes():
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True).stdout
    steps = re.findall(r"^  - (.+?) \(at most (\d+)s\): (.+)$", out, flags=re.M)
    names = [s[0] for s in steps]
    assert names == ["machine", "kernel tests on CUDA", "conformance matrix on CUDA (auto backend)",
                     "kernels benchmark, quick rows", "speed benchmark, quick rows"]
    assert sum(int(s[1]) for s in steps) <= 8 * 60
    assert "ATTNEDIT_TEST_DEVICE=cuda" in steps[2][2] and "tests/test_conformance.py" in steps[2][2]
    assert "TRITON_INTERPRET=0" in steps[1][2]


def test_bad_arguments_are_refused():
    res = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown argument '--bogus'" in res.stderr


def test_the_quick_kernel_rows_exist():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--dry-run", "--filter",
                          "SD1.5 512|FLUX 1024"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert int(re.search(r"(\d+) cases", out).group(1)) >= 4
