"""Checkpoints: atomic saving, loading with `weights_only=True`, and a pickle-free .safetensors model file.

A checkpoint is untrusted input (they are passed around labs), so nothing here unpickles arbitrary
objects: torch's weights-only unpickler is always on, and the stage-2 model is also shared as
.safetensors with its classes, palette and normalisation in the metadata.
"""
import json
import pickle
from pathlib import Path

import torch

from utils.files import atomic_path

STAGE1_FORMAT = "ibdr-stage1"
STAGE2_FORMAT = "ibdr-stage2"


class CheckpointError(ValueError):
    """A checkpoint that cannot or must not be used; the message names the file."""


def save_checkpoint(path, payload):
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _unpickling_reason(error):
    """What torch's weights-only unpickler objected to, without its advice to load the file unsafely."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith(boilerplate)]
    return lines[0][:160] if lines else "an object that is not a tensor"


def load_checkpoint(path, expected_format=None):
    """Load a .pth written by this project; refuse anything else with one sentence."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        return load_safetensors(path, expected_format)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or its legacy pickle format
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (the file is empty or of another kind).")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused, it holds objects that are not plain weights and could run code "
                              f"when loaded ({_unpickling_reason(error)}); use a checkpoint written by this "
                              "project.") from None
    except Exception as error:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:160] if str(error) else 'no detail'}).") from None
    if expected_format is not None:
        found = payload.get("format") if isinstance(payload, dict) else None
        if found != expected_format:
            raise CheckpointError(f"{path}: not a {expected_format} checkpoint of this project "
                                  f"(format {found!r}); pass the file that stage wrote.")
    return payload


def save_safetensors(path, state_dict, fmt, meta):
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": fmt, "meta": json.dumps(meta)})


def load_safetensors(path, expected_format=None):
    """Returns {"format", "meta", "model"} like a .pth checkpoint."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({error}).") from None
    fmt = metadata.get("format")
    if expected_format is not None and fmt != expected_format:
        raise CheckpointError(f"{path}: not a {expected_format} model of this project (format {fmt!r}).")
    try:
        meta = json.loads(metadata.get("meta", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its metadata is damaged; re-export it from the .pth checkpoint.") from None
    return {"format": fmt, "meta": meta, "model": state}
