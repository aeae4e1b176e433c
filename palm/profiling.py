"""Measuring what a piece of code allocates, for benchmarks and for checking estimates, and
how much memory the machine has left."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The kernel's estimate of memory available without swapping (Linux `MemAvailable`);
    None where it cannot be read (another OS)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # given in KiB
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated by `fn()` and alive at once, beyond those alive before.

    Replays the profiler's record of every tensor allocation and free (profile_memory=True).
    Unlike the process's resident set, this does not count memory that the allocator keeps
    after tensors are freed, so it measures what the code needs, not how malloc reuses it.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
