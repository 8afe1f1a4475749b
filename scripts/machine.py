"""The line every benchmark table carries: where its numbers came from."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(*packages: str) -> str:
    """CPU model, usable cores, Python, NumPy, h5py (and ``packages``) versions, and the date."""
    versions = []
    for name in ("numpy", "h5py", *packages):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} absent")
    return (
        f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; Python "
        f"{platform.python_version()}, {', '.join(versions)}; {datetime.date.today()}"
    )
