"""Where and how long a step ran: the hardware, the software and the wall time, kept beside its outputs so
that results tables are generated from the run rather than written by hand."""
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RUN_RECORD = "run.json"


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def hardware(device=None, world_size=1):
    """What the step ran on, as a dict that loads back from JSON."""
    import torch
    info = {"cpu": cpu_model(), "cpu_cores": usable_cores(), "torch_threads": torch.get_num_threads(),
            "processes": int(world_size), "device": str(device) if device is not None else "cpu"}
    if device is not None and getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def describe_hardware(info):
    """'2 CPU cores (Intel Xeon ...)' or '1 x NVIDIA H200 (16 CPU cores)'."""
    if info.get("gpu"):
        count = max(1, int(info.get("processes", 1)))
        return f"{count} x {info['gpu']} ({info['cpu_cores']} CPU cores)"
    return f"{info['cpu_cores']} CPU cores ({info['cpu']})"


def git_commit():
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def software():
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "commit": git_commit()}


class StepTimer:
    """Wall time of one step from its start; `record` gives the dict saved as run.json."""

    def __init__(self, step):
        self.step, self.started = step, time.perf_counter()
        self.started_at = datetime.now(timezone.utc)

    @property
    def seconds(self):
        return time.perf_counter() - self.started

    def record(self, device=None, world_size=1, **extra):
        return {"step": self.step, "seconds": round(self.seconds, 1),
                "started": self.started_at.isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "hardware": hardware(device, world_size), "software": software(), **extra}
