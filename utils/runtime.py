"""Device, precision and distribution, decided once per run.

Every script calls `setup_runtime(cfg)` and passes the result around; nothing else picks a device,
hard-codes a GPU or reads torchrun's environment.
"""
import contextlib
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from utils.config import ConfigError, source_of


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype      # None: full fp32
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    num_workers: int = 0
    cuda_graphs: bool = False   # training steps and inference replayed from CUDA graphs (utils/cuda_graphs.py)

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # No weight-cast cache: it cannot live inside a captured CUDA graph, and each weight is cast once
        # per step anyway.
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, cache_enabled=False)

    def grad_scaler(self):
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        enabled = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        return torch.amp.GradScaler("cuda", enabled=enabled)

    def shard(self, items):
        """This rank's share of a list, for writing each output exactly once."""
        return items[self.rank::self.world_size]

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor):
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_buffers(self, module):
        """Give every rank rank 0's buffers (BatchNorm running statistics), which is what rank 0 saves.

        DDP syncs buffers at the start of each forward, but the last training batch moves them apart again.
        """
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


def _pick_device(requested, local_rank, source):
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{source}: 'device' is {requested!r}, but no CUDA GPU is visible; use cpu or auto.")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"{source}: 'device' is {requested!r}, but this machine shows "
                              f"{torch.cuda.device_count()} GPU(s), numbered from 0; use cuda, auto or cpu.")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{source}: 'device' is 'mps', but Apple's GPU is not available here; use cpu or auto.")
    return device


def cpu_has_native_bf16(cpuinfo="/proc/cpuinfo"):
    """AVX512-BF16 or AMX (x86), or Arm's BF16 extension: the instructions that make bf16 convolutions faster
    than fp32 on a CPU. Read from /proc/cpuinfo's flags where it exists, else asked of torch."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            flags = {flag for line in handle if line.lower().startswith(("flags", "features"))
                     for flag in line.split(":", 1)[-1].split()}
    except OSError:
        flags = None
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check() for check in checks if check is not None)


def _pick_precision(requested, device, source):
    if requested == "fp32" or (requested == "auto" and device.type != "cuda"):
        return None
    if device.type == "cpu" and requested == "fp16":
        raise ConfigError(f"{source}: 'precision' is 'fp16', which a CPU runs many times slower than fp32 (it has no "
                          "fp16 kernels to speak of); use fp32, or bf16 on a CPU with native bf16 (AVX512-BF16 or "
                          "AMX).")
    if requested == "bf16":
        if device.type == "cpu" and not cpu_has_native_bf16():
            print("warning: precision bf16 on this CPU, which has no native bf16 (AVX512-BF16 or AMX), is emulated "
                  "and many times slower than fp32; --set precision=fp32 runs at full speed.", file=sys.stderr,
                  flush=True)
        return torch.bfloat16
    if requested == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_runtime(cfg, device=None):
    """Initialise distribution (under torchrun), choose device and precision, seed per rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _pick_device(device or cfg.device, local_rank, "the command line" if device else source_of(cfg, "device"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group(backend=backend)
    if chosen.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    workers = cfg.num_workers
    if workers < 0:
        workers = min(8, max(0, (os.cpu_count() or 1) // max(world_size, 1) - 1))
        if chosen.type == "cpu":
            workers = min(workers, 2)
    seed_everything(cfg.seed + rank)
    precision = _pick_precision(cfg.precision, chosen, source_of(cfg, "precision"))
    # Graphs need one process (DDP's gradient hooks are not captured), no loss scaling (the scaler reads
    # the gradients on the host) and no torch.compile (which brings its own).
    graphs = (cfg.cuda_graphs and chosen.type == "cuda" and world_size == 1 and precision != torch.float16
              and not cfg.compile)
    return Runtime(chosen, precision, rank, world_size, local_rank, workers, graphs)


def compile_model(model):
    """torch.compile, falling back to the plain model (with a warning) wherever compiling fails."""
    try:
        import torch._dynamo
        torch._dynamo.config.suppress_errors = True  # a failed graph compile runs eagerly instead of stopping
        return torch.compile(model)
    except Exception as error:  # no compiler for this Python or platform
        import warnings
        warnings.warn(f"torch.compile is unavailable here ({type(error).__name__}: {error}); running without it.",
                      RuntimeWarning)
        return model


def loader_options(runtime, train):
    options = {"num_workers": runtime.num_workers, "pin_memory": runtime.device.type == "cuda"}
    if runtime.num_workers > 0:
        options.update(prefetch_factor=4)
        if train:  # kept between epochs; augmentation is seeded per sample, so resuming stays exact
            options.update(persistent_workers=True)
    return options


def unwrap(model):
    """The plain model inside DDP / torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def cleanup(runtime, wait_for_all=True):
    """Close the process group. By default every rank first waits for the others: a rank that tears down its
    end while rank 0 is still writing its last files can abort the whole job."""
    if runtime.distributed and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def start_run(cfg, runtime, stage):
    """The run folder, checked to be writable; the demo data made first when the config asks. The folder's
    config.yaml is written later, with the run's first own output (utils/run_folder.py)."""
    from utils.run_folder import announce_rerun, check_output_folder
    out_dir = check_output_folder(cfg, stage)
    if runtime.is_main:
        announce_rerun(out_dir)
        if cfg.data.demo:
            from utils.data.demo_data import ensure_demo_dataset
            ensure_demo_dataset(cfg)
    runtime.barrier()
    return out_dir
