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


def _looks_like_torch_file(path):
    """torch's zip format, or its legacy pickle format: other bytes are not worth unpickling."""
    with open(path, "rb") as handle:
        return handle.read(4).startswith((b"PK\x03\x04", b"\x80"))


def read_weight_file(path, what):
    """{name: tensor} from a weight file (.pth loaded weights-only, or .safetensors).

    A state dict wrapped under "state_dict" or "model" is unwrapped, and the "module." prefix of weights
    saved from a DataParallel wrapper is removed. `what` names the file in errors ("encoder weight file").
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        elif not _looks_like_torch_file(path):
            raise ValueError("not a PyTorch file")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{what} {path} holds objects that are not plain weights and was refused "
                         f"({_unpickling_reason(error)}).") from None
    except Exception as error:  # truncated, empty or foreign files
        detail = str(error).splitlines()[0][:160] if str(error) else "no detail"
        raise ValueError(f"{what} {path} cannot be read as plain weights ({type(error).__name__}: {detail}).") from None
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {path} holds no state dict of tensors.")
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def describe_misfit(missing=(), unexpected=(), wrong_shape=(), shown=6):
    """'missing keys: a, b; wrong shapes: ...' for a weight file that does not fit; '' when it fits."""
    def some(names):
        names = sorted(names)
        return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")

    parts = [f"{label}: {some(names)}" for label, names in
             (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes (file vs model)", wrong_shape))
             if names]
    return "; ".join(parts)


def load_checkpoint(path, expected_format=None):
    """Load a .pth written by this project; refuse anything else with one sentence."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        return load_safetensors(path, expected_format)
    if not _looks_like_torch_file(path):
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
