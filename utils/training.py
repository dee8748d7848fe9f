"""Training helpers shared by both stages: optimiser groups, poly schedule, logging, fault checks."""
import csv
import math
from pathlib import Path

import torch
import torch.nn as nn

from utils.files import atomic_path


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, out of memory); the message says what to change."""


def sgd_with_multipliers(pretrained_modules, new_groups, lr, momentum, weight_decay, layer_scales=None):
    """SGD with the usual WSSS multipliers: x1 weights / x2 biases for pretrained layers, and for each group of
    new layers in `new_groups` ([(modules, m)]) xm weights / x2m biases (m = 10: the usual x10 / x20).

    Biases and normalisation parameters get no weight decay. Frozen parameters are left out. `layer_scales`
    ({id(param): factor}, see layer_decay_scales) scales the rate of pretrained parameters further.
    """
    layer_scales = layer_scales or {}
    groups, seen = {}, set()
    for modules, mult in [(pretrained_modules, None), *new_groups]:
        for module in modules:
            for name, param in module.named_parameters():
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                scale = layer_scales.get(id(param), 1.0) if mult is None else 1.0
                groups.setdefault((mult is not None, "b" if param.ndim <= 1 else "w", mult or 1.0, scale),
                                  []).append(param)
    # old weights, old biases, then new weights and biases; deeper layers (larger scale) first within each
    order = sorted(groups, key=lambda key: (key[0], key[1] == "b", key[2], -key[3]))
    param_groups = []
    for new, kind, mult, scale in order:
        rate = lr * mult * (2.0 if kind == "b" else 1.0) * scale
        param_groups.append({"params": groups[(new, kind, mult, scale)], "lr": rate, "initial_lr": rate,
                             "weight_decay": 0.0 if kind == "b" else weight_decay})
    return sgd(param_groups, lr, momentum, weight_decay)


def layer_decay_scales(module, decay):
    """{id(param): lr factor} for layer-wise learning-rate decay over a module that lists its layer_groups()
    from the input side to the output side: the last group keeps the full rate, each one before it is
    scaled by `decay` once more (so a ViT's patch embedding learns slowest). decay 1: {} (off)."""
    if decay == 1:
        return {}
    named = dict(module.named_parameters())
    groups = module.layer_groups()
    return {id(named[name]): decay ** (len(groups) - 1 - depth)
            for depth, names in enumerate(groups) for name in names}


def sgd_with_layer_decay(model, encoder, lr, momentum, weight_decay, decay):
    """SGD over the trainable parameters of `model`; those of `encoder` at rates scaled by layer decay."""
    scales = layer_decay_scales(encoder, decay)
    groups = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault(scales.get(id(param), 1.0), []).append(param)
    param_groups = [{"params": params, "lr": lr * scale, "initial_lr": lr * scale}
                    for scale, params in sorted(groups.items(), reverse=True)]
    return sgd(param_groups, lr, momentum, weight_decay)


def sgd(params, lr, momentum, weight_decay):
    """torch SGD; on GPUs the fused kernel, which updates every parameter in one pass instead of several."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.is_cuda and p.is_floating_point() for p in tensors)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)


def set_poly_lr(optimizer, step, total_steps, power):
    factor = (1 - min(step, total_steps) / max(total_steps, 1)) ** power
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def freeze_batchnorm(module):
    """Keep BatchNorm statistics and affine parameters fixed (eval mode, no gradient)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()
            for param in layer.parameters():
                param.requires_grad_(False)


def check_finite(loss_value, epoch, step, checkpoint_hint):
    """`loss_value` is a Python float; `step` is 0-based over the whole run, the message counts from 1."""
    if not math.isfinite(loss_value):
        raise TrainingError(f"the loss became {loss_value} at epoch {epoch + 1}, step {step + 1} "
                            "(counted from the start of training); training stopped "
                            f"({checkpoint_hint}). Lower the learning rate or check the data.")


def out_of_memory_message(setting):
    return (f"the GPU ran out of memory; lower {setting} (e.g. --set {setting}=<half>) or use a smaller "
            "image size.")


class CsvLog:
    """Append-only per-epoch log; rewritten atomically so it is never half a line."""

    def __init__(self, path, fields, keep_existing=False):
        self.path, self.fields = Path(path), list(fields)
        self.rows = []
        if keep_existing and self.path.is_file():
            with open(self.path, newline="") as handle:
                self.rows = list(csv.DictReader(handle))
        self.board = None
        try:  # TensorBoard too, when the package is installed
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(str(self.path.parent / "tensorboard"))
        except ImportError:
            pass

    def append(self, row):
        self.rows.append({k: row.get(k, "") for k in self.fields})
        if self.board is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, row["epoch"])
            self.board.flush()
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(self.rows)

    def truncate(self, epochs):
        self.rows = self.rows[:epochs]


def restore_scaler(scaler, state):
    """fp16 loss scaling goes on at the scale it had reached; files from bf16 or fp32 runs hold none."""
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def rng_state():
    """Every random generator a run uses, in a form that loads with weights_only=True."""
    import random
    import numpy as np
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    import random
    import numpy as np
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"],
                         saved["has_gauss"], saved["gauss"]))
    saved = state["python"]
    random.setstate((saved["version"], tuple(saved["internal"]), saved["gauss_next"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics (a steadier model to
    evaluate and keep than the last step's). The decay warms up as (1 + t) / (10 + t) so early averages are
    not dominated by the random initialisation."""

    def __init__(self, model, decay):
        import copy
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    def _pairs(self, model):
        mine = dict(self.model.state_dict(keep_vars=True))
        return [(mine[name], tensor) for name, tensor in model.state_dict(keep_vars=True).items()]

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        floats = [(mine, theirs.detach()) for mine, theirs in self._pairs(model) if mine.is_floating_point()]
        torch._foreach_lerp_([m for m, _ in floats], [t for _, t in floats], 1.0 - decay)
        for mine, theirs in self._pairs(model):
            if not mine.is_floating_point():
                mine.copy_(theirs)

    def state_dict(self):
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
