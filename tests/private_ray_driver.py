"""Run a sweep script (``python tests/private_ray_driver.py SCRIPT ARGS...``) on a Ray of its own.

``ensure_ray`` would join a Ray it finds on this machine (another test session's); this driver starts
a local one first, sized by ``RAYDINO_TEST_CPUS``, so killing the driver's process group kills its Ray
with it, as a head restart would, and nobody else's trials.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import ray

from raydino.train.driver import PRIVATE_RAY_SYSTEM_CONFIG

if __name__ == "__main__":
    ray.init(address="local", num_cpus=int(os.environ.get("RAYDINO_TEST_CPUS", "5")), log_to_driver=True,
             configure_logging=False, _system_config=PRIVATE_RAY_SYSTEM_CONFIG)
    script = Path(sys.argv[1]).resolve()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(script.parent))  # the script's own `from _common import ...`
    runpy.run_path(str(script), run_name="__main__")
