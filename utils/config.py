"""One config object per run: defaults below, a dataset YAML on top, then `--set key=value` overrides.

Every key a YAML may use is listed in DEFAULTS; an unknown key or a value of the wrong type is an
error naming the key, raised before any work starts.
"""
import argparse
import copy
from pathlib import Path

import yaml

from utils.files import write_text

# `None` in DEFAULTS means "optional"; the allowed types for such keys are in OPTIONAL_TYPES.
DEFAULTS = {
    "name": "demo",
    "seed": 0,
    "device": "auto",          # auto | cpu | cuda | cuda:N | mps
    "precision": "auto",       # auto (bf16/fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    "num_workers": -1,         # -1: chosen from the machine
    "compile": False,          # torch.compile the training model when available
    "cuda_graphs": True,       # replay training steps from CUDA graphs (one CUDA GPU, bf16 or fp32)
    "runs_dir": "runs",
    "data": {
        "root": "datasets/demo",
        "classes": ["background", "gland"],
        "palette": [[239, 239, 239], [190, 61, 42]],
        "mask_encoding": "index",        # index | binary255 | instance
        "pseudo_mask_dir": None,         # default: <root>/train/pseudo_mask
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "demo": False,                   # synthesise the demo data set when root is missing
        "fill_holes": [],                # class names whose enclosed holes are filled in masks (glands)
    },
    "demo": {                            # synthetic data (only read when data.demo is true)
        "train_images": 160,
        "val_images": 8,
        "test_images": 12,
        "tile_size": 96,
        "test_size": [160, 128],
        "stain_shift": 0.0,
        "target_domain": True,           # also write a stain-shifted second domain for few-shot demos
    },
    "prepare": {                         # 0_prepare_data.py
        "mode": "glas",                  # glas | generic
        "patch_size": 112,
        "stride": 56,
        "min_class_fraction": 0.05,
        "val_images": [],                # explicit list of training image stems held out as val
        "val_count": 5,                  # otherwise this many, chosen by seed
        "raw_mask_encoding": "instance", # for generic mode
        "raw_mask_suffix": "_anno",
    },
    "stage1": {
        "backbone": "resnet38",          # resnet38 or any timm model name
        "pretrained": False,             # false | true (timm hub) | path to a weight file
        "out_indices": [2, 3, 4],        # timm backbones: the three taps
        "output_stride": 8,              # timm backbones that support dilation
        "ibm": True,
        "image_size": 224,
        "epochs": 10,
        "batch_size": 20,
        "lr": 0.01,
        "momentum": 0.0,
        "weight_decay": 0.0005,
        "poly_power": 0.9,
        "grad_clip": 5.0,
        "lr_mult_new": 10.0,
        "freeze_bn": True,
        "freeze_stem": True,
        "head_weights": [0.2, 0.3, 0.5],
        "boundary_weight": 0.01,
        "embedding_weight": 0.01,
        "cam_weights": [1.0, 1.0, 1.0],
        "cam_scales": [1.0],
        "cam_flip": True,
        "label_threshold": 0.25,         # predicted-label threshold where no image label is known
        "cam_batch_size": 16,
        "samples": 6,                    # images in samples.png
    },
    "stage2": {
        "encoder": "resnest200e",
        "pretrained": False,
        "crop_size": 224,
        "epochs": 10,
        "batch_size": 16,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 0.0005,
        "poly_power": 0.9,
        "aux_weight": 0.4,
        "sync_bn": False,
        "window": 224,
        "overlap": 0.5,
        "eval_batch_size": 8,
        "iicb": {"alpha": 1.0, "beta": 0.2, "gamma": 0.1, "delta": 0.1, "eta": 0.1, "tau": 0.4},
        "init_from": None,
        "train_masks": "pseudo",         # pseudo | ground_truth
        "max_train_images": None,
        "accept_foreign_pseudo_masks": False,
    },
    "inference": {
        "batch_size": 16,
        "window": 224,
        "overlap": 0.25,
    },
}

OPTIONAL_TYPES = {
    "data.pseudo_mask_dir": (str,),
    "stage2.init_from": (str,),
    "stage2.max_train_images": (int,),
}
UNION_TYPES = {  # keys that accept more than one type
    "stage1.pretrained": (bool, str),
    "stage2.pretrained": (bool, str),
}
CHOICES = {
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "data.mask_encoding": ("index", "binary255", "instance"),
    "prepare.mode": ("glas", "generic"),
    "prepare.raw_mask_encoding": ("index", "binary255", "instance"),
    "stage2.train_masks": ("pseudo", "ground_truth"),
}
NON_NEGATIVE = ("stage1.epochs", "stage2.epochs", "stage1.batch_size", "stage2.batch_size", "stage1.lr",
                "stage2.lr", "seed", "stage1.weight_decay", "stage2.weight_decay", "demo.train_images")
POSITIVE = ("stage1.batch_size", "stage2.batch_size", "stage1.image_size", "stage2.crop_size",
            "stage2.window", "inference.window", "prepare.patch_size", "prepare.stride",
            "stage1.cam_batch_size", "stage2.eval_batch_size", "inference.batch_size")


class ConfigError(ValueError):
    """A wrong key or value in a config; the message names the key."""


class Config(dict):
    """A nested dict with attribute access: cfg.stage1.lr."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value

    def to_dict(self):
        return {k: (v.to_dict() if isinstance(v, Config) else copy.deepcopy(v)) for k, v in self.items()}


def _wrap(value):
    if isinstance(value, dict):
        return Config({k: _wrap(v) for k, v in value.items()})
    return value


def _type_ok(key, default, value):
    if value is None:
        return default is None or key in OPTIONAL_TYPES
    if key in UNION_TYPES:
        return isinstance(value, UNION_TYPES[key])
    if default is None:
        return isinstance(value, OPTIONAL_TYPES.get(key, (object,)))
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _merge(base, update, source, prefix=""):
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{source}: unknown key '{dotted}'; known keys here: {', '.join(sorted(base))}.")
        default = base[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping of settings, not {value!r}.")
            _merge(default, value, source, dotted + ".")
            continue
        template = DEFAULTS
        for part in dotted.split("."):
            template = template[part]
        if isinstance(template, float) and isinstance(value, str):
            try:  # YAML 1.1 reads '1e-3' as a string
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(dotted, template, value):
            expected = (" or ".join(t.__name__ for t in UNION_TYPES.get(dotted, OPTIONAL_TYPES.get(dotted, ())))
                        or type(template).__name__)
            raise ConfigError(f"{source}: '{dotted}' must be {expected}, got {value!r}.")
        base[key] = float(value) if isinstance(template, float) else value


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _validate(cfg, source):
    for key, choices in CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(choices)}, got {_get(cfg, key)!r}.")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{source}: '{key}' must not be negative, got {_get(cfg, key)!r}.")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{source}: '{key}' must be positive, got {_get(cfg, key)!r}.")
    classes, palette = cfg["data"]["classes"], cfg["data"]["palette"]
    if len(classes) < 2:
        raise ConfigError(f"{source}: 'data.classes' needs at least two classes, got {classes!r}.")
    if len(palette) != len(classes) or any(len(c) != 3 for c in palette):
        raise ConfigError(f"{source}: 'data.palette' needs one [R, G, B] colour per class "
                          f"({len(classes)} classes, {len(palette)} colours).")
    unknown = [name for name in cfg["data"]["fill_holes"] if name not in classes]
    if unknown:
        raise ConfigError(f"{source}: 'data.fill_holes' names {unknown}, which are not in data.classes {classes}.")
    for key in ("stage1.head_weights", "stage1.cam_weights"):
        if len(_get(cfg, key)) != 3:
            raise ConfigError(f"{source}: '{key}' needs three numbers, one per classifier head.")
    if len(cfg["stage1"]["out_indices"]) != 3:
        raise ConfigError(f"{source}: 'stage1.out_indices' needs three stage indices.")
    if not 0 <= cfg["stage2"]["overlap"] < 1 or not 0 <= cfg["inference"]["overlap"] < 1:
        raise ConfigError(f"{source}: 'overlap' must be in [0, 1).")


def parse_override(text):
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: write it as key=value, e.g. --set stage1.epochs=3.")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    update = value
    for part in reversed(key.strip().split(".")):
        update = {part: update}
    return update


def load_config(path=None, overrides=()):
    """Defaults <- YAML file <- overrides; validated; returns a Config."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pick one in configs/.")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]}).") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings.")
        _merge(cfg, loaded, str(path))
        if "name" not in loaded:
            cfg["name"] = path.stem
    for text in overrides:
        _merge(cfg, parse_override(text), f"--set {text}")
    _validate(cfg, str(path) if path else "config")
    return _wrap(cfg)


def save_config(cfg, path):
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run_dir(cfg, stage):
    return Path(cfg.runs_dir) / cfg.name / stage


def pseudo_mask_dir(cfg):
    return Path(cfg.data.pseudo_mask_dir or Path(cfg.data.root) / "train" / "pseudo_mask")


def base_parser(description, default_config="configs/demo.yaml"):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="dataset YAML (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set stage1.epochs=3 (repeatable)")
    return parser
