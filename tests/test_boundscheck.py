"""The Numba kernels under bounds checking: an index out of range fails here, not by luck elsewhere.

tests/boundscheck_kernels.py runs every kernel of kernels/numba_cpu.py on small shapes in a child
process with NUMBA_BOUNDSCHECK=1, in a Numba cache folder of its own (kept in pytest's cache, so
only the first run pays for compiling; the checked builds never mix with the normal ones).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import load

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
def test_numba_kernels_stay_in_bounds(request, tmp_path):
    pytest_cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = pytest_cache.mkdir("numba-boundscheck") if pytest_cache else tmp_path
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "boundscheck_kernels.py")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, (done.stdout[-1500:], done.stderr[-3000:])
    assert "checked" in done.stdout.splitlines()[-1], done.stdout[-1500:]
