"""A test module that needs an optional extra fails, naming the extra, when it is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_caqra_tests_fail_when_the_extra_is_missing(tmp_path: Path) -> None:
    # A module named xarray that refuses to import stands in for an environment without it.
    (tmp_path / "xarray.py").write_text("raise ImportError('xarray hidden by the test')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_caqra.py", "--collect-only"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-2000:]
    assert "skipped" not in output.lower(), output[-2000:]
    assert "optional `caqra` extra" in output and "pip install -e .[caqra]" in output
