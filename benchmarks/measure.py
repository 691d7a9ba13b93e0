"""What the benchmarks share: the machine's copy bandwidth (for the decode floor) and CSV output."""
import csv
import time

import numpy as np

from research.common.atomic import atomic_write


def seconds(work):
    """Wall time of one call of `work()`."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def copy_bandwidth(gib=1, repeat=5):
    """GB/s of a large float32 copy, counting the bytes read and the bytes written."""
    source = np.ones(gib * 2 ** 28, np.float32)
    target = np.empty_like(source)
    best = min(seconds(lambda: np.copyto(target, source)) for _ in range(repeat))
    return 2 * source.nbytes / best / 1e9


def write_csv(path, rows):
    """Rows (dicts with the same keys) as a CSV with a header, written atomically."""
    if not rows:
        return
    with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
