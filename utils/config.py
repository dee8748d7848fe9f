"""One config object per run: defaults below, a dataset YAML on top, then `--set key=value` overrides.

Every key a YAML may use is listed in DEFAULTS; an unknown key or a value of the wrong type is an
error naming the key, raised before any work starts.
"""
import argparse
import copy
from pathlib import Path

import yaml

from utils.errors import ConfigError  # defined apart so timm_settings can raise it; importable from here too
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
        "mean": None,                    # input normalisation; default: the stage network's pretrained_cfg
        "std": None,                     # (ImageNet's when it has none)
        "mpp": None,                     # microns per pixel of the training images (null: unknown); slides
                                         # are analysed at this resolution
        "background": "background",      # the class that is no tissue of interest, or null when every class is
        "test_splits": ["test"],         # held-out splits scored once for the final model; missing ones are skipped
        "split_titles": {},              # names for splits in reports, e.g. {test: Test A}; default: folder name
        "demo": False,                   # synthesise the demo data set when root is missing
    },
    "postprocess": {                     # optional clean-up of predicted masks, always scored beside the raw masks
        "fill_holes": [],                # class names whose enclosed holes are filled (a gland encloses its lumen)
    },
    "demo": {                            # synthetic data (only read when data.demo is true)
        "kind": "glands",                # glands (gland / background) | tissue_types (4 tissues, no background)
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
        "val_groups": None,              # a CSV naming each image's patient (first column: image name), e.g.
                                         # GlaS's Grade.csv; whole patients are then held out (path relative
                                         # to the raw folder)
        "val_group_column": "patient ID",  # the CSV column that names the patient
        "raw_mask_encoding": "instance", # for generic mode
        "raw_mask_suffix": "_anno",
    },
    "stage1": {
        "backbone": "resnet38",          # resnet38 or any timm model name, hf-hub: names included
        "backbone_kwargs": {},           # passed to timm.create_model (class names such as SwiGLUPacked, SiLU)
        "pretrained": False,             # false | true (timm or Hugging Face hub) | path to a weight file
        "out_indices": [2, 3, 4],        # convolutional timm backbones: the three taps
        "output_stride": 8,              # timm backbones that support dilation
        "vit_blocks": None,              # Vision Transformers: the three tapped blocks (default: spread over
                                         # the depth, ending with the last; negative counts from the end)
        "freeze_encoder": False,         # train only IBM and the heads
        "frozen_stages": 0,              # timm convolutional backbones: the stem and this many feature stages
                                         # get no gradient and keep their BatchNorm statistics (3: up to stride 8)
        "layer_decay": 1.0,              # Vision Transformers: lr x decay^(blocks above), 1: off
        "grad_checkpointing": False,     # timm backbones: recompute activations in backward (less memory)
        "ibm": True,
        "image_size": 224,               # training tile size (a multiple of a ViT's patch size)
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
        "pseudo_mask_fill_holes": [],    # class names whose enclosed holes are filled in the pseudo-masks
        "stitch_whole_images": False,    # also put the training images back together from their patches,
                                         # with pseudo-masks from the stitched class maps (stage2.train_on)
        "cam_refine_iterations": 0,      # training-free CAM refinement along colour edges (0: off)
        "cam_refine_dilations": [1, 2, 4, 8],
        "cam_refine_colour_scale": 0.3,
        "background_cam_scale": 1.0,     # background map weight in the pseudo-masks (< 1: foreground favoured)
        "pseudo_mask_ignore_margin": 0.0,  # stitched whole images: pixels whose two highest class votes differ
                                         # by less than this are left unlabelled for stage 2 (0: off)
        "hed_jitter": 0.0,               # stain augmentation: haematoxylin/eosin strength jitter (0: off)
        "color_jitter": 0.0,             # brightness, contrast and saturation jitter (0: off)
    },
    "stage2": {
        "encoder": "resnest200e",        # any timm model name, hf-hub: names included
        "encoder_kwargs": {},            # passed to timm.create_model, as stage1.backbone_kwargs
        "pretrained": False,
        "vit_block": -1,                 # Vision Transformers: the block whose tokens DPR decodes
        "encoder_stage": None,           # convolutional encoders: the feature stage DPR decodes (timm index;
                                         # default: the deepest at stride 8; a deeper one needs encoder_kwargs
                                         # {output_stride: 8})
        "freeze_encoder": False,         # train only the DPR decoder
        "frozen_stages": 0,              # convolutional encoders: as stage1.frozen_stages
        "layer_decay": 1.0,              # Vision Transformers: lr x decay^(blocks above), 1: off
        "grad_checkpointing": False,     # recompute encoder activations in backward (less memory)
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
        "encoder_from_stage1": False,    # start the encoder from stage 1's backbone (same timm network):
                                         # true (this run's stage-1 checkpoint) or a stage-1 checkpoint file
        "train_masks": "pseudo",         # pseudo | ground_truth
        "max_train_images": None,
        "accept_foreign_pseudo_masks": False,
        "refinement_attention": True,    # DPR's attention on the class logits (false: ablation)
        "aux_path": True,                # DPR's auxiliary path and its loss (false: ablation)
        "train_on": "patches",           # patches | whole_images (stitched by stage1.stitch_whole_images)
        "crops_per_image": 1,            # random crops per training image and epoch
        "tta_flip": False,               # average predictions over horizontal and vertical flips
        "ema_decay": 0.0,                # exponential moving average of the weights (0: off), e.g. 0.999
        "keep_epoch": "best_val",        # best_val (the epoch of highest val mIoU) | last (no val needed:
                                         # for a final model trained on every image once settings are chosen)
        "hed_jitter": 0.0,               # stain augmentation, as stage1.hed_jitter
        "color_jitter": 0.0,
        "scale_jitter": 0.0,             # image and mask resized by U(1 - s, 1 + s) before the crop (0: off)
        "rotate90": False,               # also transpose crops at random: with the flips, all 8 right-angle
                                         # rotations and mirrorings (tissue has no up)
    },
    "inference": {                       # run_pipeline.py's inference step
        "batch_size": 16,
        "window": None,                  # default: the checkpoint's (stage2.window)
        "overlap": None,                 # default: the checkpoint's (stage2.overlap)
    },
}

OPTIONAL_TYPES = {
    "prepare.val_groups": (str,),
    "data.pseudo_mask_dir": (str,),
    "data.mean": (list,),
    "data.std": (list,),
    "stage1.vit_blocks": (list,),
    "data.background": (str,),
    "data.mpp": (float, int),
    "inference.window": (int,),
    "inference.overlap": (float, int),
    "stage2.init_from": (str,),
    "stage2.max_train_images": (int,),
    "stage2.encoder_stage": (int,),
}
UNION_TYPES = {  # keys that accept more than one type
    "stage1.pretrained": (bool, str),
    "stage2.pretrained": (bool, str),
    "stage2.encoder_from_stage1": (bool, str),
}
# Mappings passed on as they are (keyword arguments of another library), not settings of ours.
MODEL_KWARGS = ("stage1.backbone_kwargs", "stage2.encoder_kwargs")
FREE_MAPPINGS = MODEL_KWARGS + ("data.split_titles",)  # mappings whose keys the user chooses
CHOICES = {
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "data.mask_encoding": ("index", "binary255", "instance"),
    "demo.kind": ("glands", "tissue_types"),
    "prepare.mode": ("glas", "generic"),
    "prepare.raw_mask_encoding": ("index", "binary255", "instance"),
    "stage2.train_masks": ("pseudo", "ground_truth"),
    "stage2.train_on": ("patches", "whole_images"),
    "stage2.keep_epoch": ("best_val", "last"),
}
NON_NEGATIVE = ("stage1.hed_jitter", "stage1.color_jitter", "stage2.hed_jitter", "stage2.color_jitter",
                "stage1.epochs", "stage2.epochs", "stage1.batch_size", "stage2.batch_size", "stage1.lr",
                "stage2.lr", "seed", "stage1.weight_decay", "stage2.weight_decay", "demo.train_images",
                "stage1.frozen_stages", "stage2.frozen_stages")
POSITIVE = ("stage1.batch_size", "stage2.batch_size", "stage1.image_size", "stage2.crop_size",
            "stage2.window", "prepare.patch_size", "prepare.stride",
            "stage1.cam_batch_size", "stage2.eval_batch_size", "inference.batch_size", "stage2.crops_per_image",
            "stage1.background_cam_scale")


# Keys of earlier versions, with where their setting lives now.
MOVED = {
    "data.fill_holes": "postprocess.fill_holes (predicted masks, scored beside the raw ones) and/or "
                       "stage1.pseudo_mask_fill_holes (the pseudo-masks stage 2 trains on)",
}


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
        allowed = OPTIONAL_TYPES.get(key, (object,))
        if isinstance(value, bool) and bool not in allowed:  # YAML's true is an int to Python
            return False
        return isinstance(value, allowed)
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
        if dotted in MOVED:
            raise ConfigError(f"{source}: '{dotted}' was replaced by {MOVED[dotted]}.")
        if key not in base:
            raise ConfigError(f"{source}: unknown key '{dotted}'; known keys here: {', '.join(sorted(base))}.")
        default = base[key]
        if dotted in FREE_MAPPINGS:
            if not isinstance(value, dict):
                what = "mapping of keyword arguments" if dotted in MODEL_KWARGS else "mapping"
                raise ConfigError(f"{source}: '{dotted}' must be a {what}, not {value!r}.")
            base[key] = {**default, **value}
            continue
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
    for key in ("postprocess.fill_holes", "stage1.pseudo_mask_fill_holes"):
        unknown = [name for name in _get(cfg, key) if name not in classes]
        if unknown:
            raise ConfigError(f"{source}: '{key}' names {unknown}, which are not in data.classes {classes}.")
    background = cfg["data"]["background"]
    if background is not None and background not in classes:
        raise ConfigError(f"{source}: 'data.background' is {background!r}, which is not in data.classes {classes}; "
                          "name the background class, or set it to null when every class is a tissue.")
    if background is not None and background in cfg["postprocess"]["fill_holes"]:
        raise ConfigError(f"{source}: 'postprocess.fill_holes' names the background class {background!r}.")
    splits = cfg["data"]["test_splits"]
    if any(not isinstance(s, str) or not s or s in ("train", "val") or "/" in s for s in splits) \
            or len(set(splits)) != len(splits):
        raise ConfigError(f"{source}: 'data.test_splits' must list distinct folder names under data.root other "
                          f"than train and val, got {splits!r}.")
    for key in ("stage1.head_weights", "stage1.cam_weights"):
        if len(_get(cfg, key)) != 3:
            raise ConfigError(f"{source}: '{key}' needs three numbers, one per classifier head.")
    if len(cfg["stage1"]["out_indices"]) != 3:
        raise ConfigError(f"{source}: 'stage1.out_indices' needs three stage indices.")
    _validate_encoder_settings(cfg, source)
    if cfg["stage1"]["background_cam_scale"] != 1 and background is None:
        raise ConfigError(f"{source}: 'stage1.background_cam_scale' weighs the background class, but "
                          "'data.background' is null; leave it at 1.")
    for key in ("stage1.hed_jitter", "stage1.color_jitter", "stage2.hed_jitter", "stage2.color_jitter",
                "stage2.ema_decay", "stage2.scale_jitter", "stage1.pseudo_mask_ignore_margin"):
        if not 0 <= _get(cfg, key) < 1:
            raise ConfigError(f"{source}: '{key}' must be in [0, 1), got {_get(cfg, key)!r}.")
    for key in ("stage2.overlap", "inference.overlap"):
        if _get(cfg, key) is not None and not 0 <= _get(cfg, key) < 1:
            raise ConfigError(f"{source}: '{key}' must be in [0, 1), got {_get(cfg, key)!r}.")
    mpp = cfg["data"]["mpp"]
    if mpp is not None and not mpp > 0:
        raise ConfigError(f"{source}: 'data.mpp' must be a positive number of microns per pixel, or null when "
                          f"unknown; got {mpp!r}.")
    if cfg["inference"]["window"] is not None and cfg["inference"]["window"] <= 0:
        raise ConfigError(f"{source}: 'inference.window' must be positive, got {cfg['inference']['window']!r}.")


def _validate_encoder_settings(cfg, source):
    from utils.timm_settings import model_kwargs
    for key in ("data.mean", "data.std"):
        value = _get(cfg, key)
        if value is not None and (len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                              for v in value)):
            raise ConfigError(f"{source}: '{key}' needs three numbers (R, G, B) or null, got {value!r}.")
    if cfg["data"]["std"] is not None and min(cfg["data"]["std"]) <= 0:
        raise ConfigError(f"{source}: 'data.std' must be positive, got {cfg['data']['std']!r}.")
    blocks = cfg["stage1"]["vit_blocks"]
    if blocks is not None and (len(blocks) != 3 or not all(isinstance(b, int) and not isinstance(b, bool)
                                                            for b in blocks)):
        raise ConfigError(f"{source}: 'stage1.vit_blocks' needs three block indices or null, got {blocks!r}.")
    for key in ("stage1.layer_decay", "stage2.layer_decay"):
        if not 0 < _get(cfg, key) <= 1:
            raise ConfigError(f"{source}: '{key}' must be in (0, 1] (1: off), got {_get(cfg, key)!r}.")
    titles = cfg["data"]["split_titles"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in titles.items()):
        raise ConfigError(f"{source}: 'data.split_titles' maps split folders to names, e.g. {{test: Test A}}; "
                          f"got {titles!r}.")
    for key in MODEL_KWARGS:
        try:
            model_kwargs(_get(cfg, key), key)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None


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


def _config_layers(path, seen=()):
    """[(source, settings)] of a YAML file, preceded by those of the file its `base:` key names (a path relative
    to it), so that a variant of a recipe states only what it changes."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]}).") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings.")
    base = loaded.pop("base", None)
    if base is None:
        return [(str(path), loaded)]
    base_path = path.parent / str(base)
    if not isinstance(base, str) or not base_path.is_file():
        raise ConfigError(f"{path}: 'base' must name another config file beside it; {base_path} does not exist.")
    if base_path.resolve() in seen or base_path.resolve() == path.resolve():
        raise ConfigError(f"{path}: 'base: {base}' leads back to a file already read; break the loop.")
    return _config_layers(base_path, seen + (path.resolve(),)) + [(str(path), loaded)]


def load_config(path=None, overrides=()):
    """Defaults <- YAML file <- overrides; validated; returns a Config."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pick one in configs/.")
        layers = _config_layers(path)
        for source, loaded in layers:
            _merge(cfg, loaded, source)
        cfg["name"] = layers[-1][1].get("name", path.stem)  # a base file's name is not inherited
    for text in overrides:
        _merge(cfg, parse_override(text), f"--set {text}")
    _validate(cfg, str(path) if path else "config")
    return _wrap(cfg)


def save_config(cfg, path):
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run_dir(cfg, stage):
    return Path(cfg.runs_dir) / cfg.name / stage


def background_index(classes, background):
    """Index of the background class in `classes`, or None when every class is a tissue."""
    return None if background is None else list(classes).index(background)


def pseudo_mask_dir(cfg):
    return Path(cfg.data.pseudo_mask_dir or Path(cfg.data.root) / "train" / "pseudo_mask")


def base_parser(description, default_config="configs/demo.yaml"):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="dataset YAML (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set stage1.epochs=3 (repeatable)")
    return parser
