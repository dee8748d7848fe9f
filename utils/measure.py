"""Measuring a step: its time per call, the peak memory, its FLOPs and model-FLOPs utilisation, and the
operators that take the most time. Used by bench.py; nothing in training depends on it.
"""
import gc
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device name, for model-FLOPs utilisation.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "L4": 121e12, "RTX 4090": 165e12, "V100": 125e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_FLOPS.items() if key in name), None)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process high-water mark
    except ImportError:
        return None


def time_steps(step, steps, device, warmup=6):  # training steps capture their CUDA graph on the 4th call
    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def count_flops(step):
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def print_profile(name, step, device, steps=3):
    """The operators that take the most device (or CPU) time over a few steps."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"--- {name}: top operators over {steps} steps")
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def training_figure(name, step, batch, steps, runtime, profile=False):
    reset_memory(runtime.device)
    flops = count_flops(step)  # first, while the step still runs eagerly: a graph replay shows no operators
    if profile:
        print_profile(name, step, runtime.device)
    seconds = time_steps(step, steps, runtime.device)
    peak = peak_flops(runtime.device)
    return {"figure": name, "batch": batch, "images_per_s": batch / seconds, "step_ms": 1000 * seconds,
            "peak_mem_gib": peak_memory_gib(runtime.device), "tflop_per_step": flops / 1e12,
            "mfu": (flops / seconds / peak) if peak else None}
