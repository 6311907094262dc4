"""What a measurement ran on: the host's CPU model, read where the measurement happens, so a
profile (``software.cpu``) and a measured timeline (``meta.host.cpu``) can be told apart when
they come from different machines. A CPU profile prices one CPU model; runs on another model
are not what it predicts."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
