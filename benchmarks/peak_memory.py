"""Peak resident memory of a command and every process it starts (Ray's included).

    python benchmarks/peak_memory.py -- raydino pretrain

Samples the process tree every second (reading USS is itself costly). RSS counts pages shared between processes (the
Ray object store, shared libraries) once per process, so the sum overstates; USS (memory
unique to each process) understates. Both are printed.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil


def _tree_memory(root: psutil.Process) -> tuple[int, int]:
    rss = uss = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            rss, uss = rss + info.rss, uss + info.uss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss, uss


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(__doc__)
        return 2
    proc = subprocess.Popen(argv)
    root = psutil.Process(proc.pid)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, uss = _tree_memory(root)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], uss)
            time.sleep(1.0)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    code = proc.wait()
    done.set()
    thread.join()
    print(
        f"peak_memory  {' '.join(argv)}: exit {code}, {time.perf_counter() - start:.0f} s, "
        f"peak RSS sum {peak[0] / 2**30:.2f} GiB, peak USS sum {peak[1] / 2**30:.2f} GiB"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
