"""Memory-bandwidth probe: the ceiling that decode speed is measured against.

Decode at batch 1 reads every weight once per token, so achieved bandwidth
(bytes read per token x tokens/s) divided by this probe says how close to the
memory limit an engine runs.
"""

from __future__ import annotations

import statistics
import time

import torch


def measure_bandwidth(size_mib: int = 256, repeats: int = 7, device: str = "cpu") -> dict[str, float]:
    """Median read bandwidth (GB/s) of a full-tensor sum over ``size_mib`` MiB of fp32.

    The tensor should be well above the last-level cache so the sum streams from DRAM.
    Returns the median and the best (max) over ``repeats`` timed runs after one warm-up.
    """
    if size_mib <= 0 or repeats <= 0:
        raise ValueError(f"size_mib and repeats must be positive, got {size_mib}, {repeats}")
    n = size_mib * 1024 * 1024 // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    nbytes = x.numel() * x.element_size()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    x.sum()
    sync()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        sync()
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return {
        "bandwidth_gbps_median": statistics.median(rates),
        "bandwidth_gbps_max": max(rates),
        "probe_bytes": float(nbytes),
        "threads": float(torch.get_num_threads()),
    }
