"""What every results file records about the machine it was measured on."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, cores (and those usable here), the load when measuring started, memory,
    OS, Python, jax and jaxlib versions, the jax device, and ``$FEDSIM_BENCH_NOTE`` if set."""
    import jax
    import jaxlib

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        # the cores this process may run on (fewer when pinned, e.g. with taskset)
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "device": str(jax.devices()[0]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if os.environ.get("FEDSIM_BENCH_NOTE"):  # the conditions, in words (e.g. other load)
        info["note"] = os.environ["FEDSIM_BENCH_NOTE"]
    return info
