"""Every setting a YAML may use: its default and the values it accepts (SETTINGS), nested as DEFAULTS.

utils/config.py reads the layers of a run's config and checks each value against this table before any
work starts. A new setting is one line here, with its range beside its default.
"""
import math
import re

class Allowed:
    """The values one setting accepts. `text` says which (in messages); `clean(value)` returns the value as it
    is stored, or raises ValueError. `numeric` marks the settings made of numbers."""

    def __init__(self, text, clean, numeric=False, null=False, bounds=""):
        self.text, self._clean, self.numeric, self.null, self.bounds = text, clean, numeric, null, bounds

    def clean(self, value):
        if value is None and self.null:
            return None
        try:
            return self._clean(value)
        except (TypeError, OverflowError):  # e.g. an integer too large for a float
            raise ValueError from None

    def or_null(self):
        return Allowed(f"{self.text}, or null", self._clean, self.numeric, True, self.bounds)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # YAML's true is an int to Python


def _bounds(low, high, low_open=False, high_open=False):
    def written(bound):
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{written(low)}, {written(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'above' if low_open else 'at least'} {written(low)}"
    return f"{'below' if high_open else 'at most'} {written(high)}" if high is not None else ""


def number(low=None, high=None, low_open=False, high_open=False):
    """A finite number; a whole one is stored as a decimal, and `1e-3`, which YAML reads as text, is read."""
    def clean(value):
        value = float(value) if isinstance(value, str) else value
        if not _is_number(value):
            raise ValueError
        value = float(value)
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and (value >= high if high_open else value > high)):
            raise ValueError
        return value
    bounds = _bounds(low, high, low_open, high_open)
    return Allowed(f"a number {bounds}".strip(), clean, numeric=True, bounds=bounds)


def whole(low=None, high=None):
    def clean(value):
        if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low) \
                or (high is not None and value > high):
            raise ValueError
        return value
    bounds = _bounds(low, high)
    return Allowed(f"a whole number {bounds}".strip(), clean, numeric=True, bounds=bounds)


def numbers(each, count=None, least=1, most=None, not_all_zero=False):
    """A list of numbers, each allowed by `each` (a number() or whole() rule): `count` of them, or from
    `least` to `most`."""
    def clean(value):
        if not isinstance(value, list) or len(value) < (count or least) or len(value) > (count or most or len(value)):
            raise ValueError
        cleaned = [each.clean(v) for v in value]
        if not_all_zero and not any(cleaned):
            raise ValueError
        return cleaned
    how_many = {1: "one", 2: "two", 3: "three"}.get(count, count) if count else \
        (f"{least} to {most}" if most else f"at least {least}")
    kind = "whole numbers" if each.text.startswith("a whole") else "numbers"
    text = f"a list of {how_many} {kind}" + (f", each {each.bounds}" if each.bounds else "")
    return Allowed(text + (", not all 0" if not_all_zero else ""), clean, numeric=True)


def one_of(*choices):
    def clean(value):
        if isinstance(value, bool) or value not in choices:
            raise ValueError
        return value
    return Allowed("one of " + ", ".join(map(str, choices)), clean, numeric=all(isinstance(c, int) for c in choices))


def text(pattern=None, meaning="text"):
    def clean(value):
        if not isinstance(value, str) or not value.strip() or (pattern and not re.fullmatch(pattern, value)):
            raise ValueError
        return value
    return Allowed(meaning, clean)


def names(least=0, meaning="a list of names"):
    def clean(value):
        if not isinstance(value, list) or len(value) < least or len(set(map(str, value))) < len(value) \
                or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError
        return value
    return Allowed(meaning, clean)


def _kind(check, what, numeric=False):
    def clean(value):
        if not check(value):
            raise ValueError
        return value
    return Allowed(what, clean, numeric)


def _is_colour(value):
    return isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                               and 0 <= v <= 255 for v in value)


FLAG = _kind(lambda v: isinstance(v, bool), "true or false")
FLAG_OR_PATH = _kind(lambda v: isinstance(v, bool) or (isinstance(v, str) and v.strip() != ""),
                     "true, false or the path of a file")
MAPPING = _kind(lambda v: isinstance(v, dict), "a mapping")
KWARGS = _kind(lambda v: isinstance(v, dict), "a mapping of keyword arguments")
COLOURS = _kind(lambda v: isinstance(v, list) and all(map(_is_colour, v)),
                "a list of [R, G, B] colours, each value a whole number from 0 to 255", numeric=True)
TEXT = text()
PATH_OR_NULL = text(meaning="the path of a file or folder").or_null()
FRACTION = number(0, 1, high_open=True)          # [0, 1): jitter strengths, overlaps, moving-average decays
PROBABILITY = number(0, 1, low_open=True, high_open=True)
LAYER_DECAY = number(0, 1, low_open=True)        # (0, 1]; 1 is off
RATE = number(0, 10, low_open=True)              # a learning rate above 10 only diverges
MANY = 10**6                                     # a bound on counts that stops typos, not real runs
WEIGHT = number(0, MANY)                         # loss weights
POLY = number(0, 10)
SIDE = whole(16, 16384)                          # pixels: the stride-8 maps are then at least 2 x 2
COUNT = whole(0, MANY)
BATCH = whole(1, MANY)
FROZEN = whole(0, 64)                            # the network itself says how many stages it has
ENCODING = one_of("index", "binary255", "instance")
DEVICE = text(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N (N: a GPU's number) or mps")
RUN_NAME = text(r"(?!\.\.?$)[^/\\]+", "a name without / or \\ (it names a folder)")

# Every setting: its default, and the values it accepts. Sections (`stage1.`) and mappings of settings
# (`stage2.iicb.`) come from the dotted names; MAPPING and KWARGS values are mappings whose keys the user
# chooses. Cross-setting rules (a colour per class, a background among the classes) are in _check_together.
SETTINGS = {
    "name": ("demo", RUN_NAME),                       # the run's folder: <runs_dir>/<name>/
    "seed": (0, whole(0, 2**32 - 1)),
    "device": ("auto", DEVICE),
    "precision": ("auto", one_of("auto", "fp32", "bf16", "fp16")),  # auto: bf16/fp16 on GPU, fp32 on CPU
    "num_workers": (-1, whole(-1, 256)),              # -1: chosen from the machine
    "compile": (False, FLAG),                         # torch.compile the training model when available
    "cuda_graphs": (True, FLAG),                      # replay training steps from CUDA graphs (one CUDA GPU)
    "runs_dir": ("runs", text(meaning="a folder")),

    "data.root": ("datasets/demo", text(meaning="a folder")),
    "data.classes": (["background", "gland"], names(2, "a list of at least two distinct names")),
    "data.palette": ([[239, 239, 239], [190, 61, 42]], COLOURS),
    "data.mask_encoding": ("index", ENCODING),
    "data.pseudo_mask_dir": (None, text(meaning="a folder").or_null()),  # null: <root>/train/pseudo_mask
    # input normalisation in [0, 1] units; null: the stage network's pretrained_cfg (ImageNet's when none)
    "data.mean": (None, numbers(number(0, 1), count=3).or_null()),
    "data.std": (None, numbers(number(0, 1, low_open=True), count=3).or_null()),
    # microns per pixel of the training images (null: unknown); slides are analysed at this resolution
    "data.mpp": (None, number(0, 100, low_open=True).or_null()),
    "data.background": ("background", TEXT.or_null()),  # the class that is no tissue, or null when every class is
    "data.test_splits": (["test"], names(meaning="a list of distinct folder names")),  # missing ones are skipped
    "data.split_titles": ({}, MAPPING),               # names of splits in reports, e.g. {test: Test A}
    "data.demo": (False, FLAG),                       # synthesise the demo data set when root is missing

    "postprocess.fill_holes": ([], names()),          # classes whose enclosed holes are filled in predictions

    "demo.kind": ("glands", one_of("glands", "tissue_types")),  # only read when data.demo is true
    "demo.train_images": (160, whole(1, MANY)),
    "demo.val_images": (8, COUNT),
    "demo.test_images": (12, COUNT),
    "demo.tile_size": (96, SIDE),
    "demo.test_size": ([160, 128], numbers(SIDE, count=2)),
    "demo.stain_shift": (0.0, number(-2, 2)),
    "demo.target_domain": (True, FLAG),               # also write a stain-shifted second domain

    "prepare.mode": ("glas", one_of("glas", "generic")),  # 0_prepare_data.py
    "prepare.patch_size": (112, SIDE),
    "prepare.stride": (56, whole(1, 16384)),
    "prepare.min_class_fraction": (0.05, FRACTION),
    "prepare.val_images": ([], names()),              # training image stems held out whole as val
    "prepare.val_count": (5, COUNT),                  # otherwise this many, chosen by seed
    "prepare.val_groups": (None, PATH_OR_NULL),       # a CSV naming each image's patient (GlaS's Grade.csv)
    "prepare.val_group_column": ("patient ID", TEXT),
    "prepare.raw_mask_encoding": ("instance", ENCODING),  # generic mode
    "prepare.raw_mask_suffix": ("_anno", TEXT),

    "stage1.backbone": ("resnet38", TEXT),            # resnet38 or any timm name, hf-hub: names included
    "stage1.backbone_kwargs": ({}, KWARGS),           # passed to timm.create_model
    "stage1.pretrained": (False, FLAG_OR_PATH),       # false | true (timm or the hub) | a weight file | package:
    "stage1.out_indices": ([2, 3, 4], numbers(whole(-16, 16), count=3)),  # convolutional timm backbones
    "stage1.output_stride": (8, one_of(8, 16, 32)),   # timm backbones that support dilation
    "stage1.vit_blocks": (None, numbers(whole(-1024, 1023), count=3).or_null()),  # ViTs; null: spread
    "stage1.freeze_encoder": (False, FLAG),           # train only IBM and the heads
    "stage1.frozen_stages": (0, FROZEN),              # timm convolutional backbones: stem + N stages frozen
    "stage1.layer_decay": (1.0, LAYER_DECAY),         # Vision Transformers: lr x decay^(blocks above)
    "stage1.grad_checkpointing": (False, FLAG),
    "stage1.ibm": (True, FLAG),
    # where IBM sits: before the deepest tapped stage, which then reads it (the paper: between ResNet-38's b6 and
    # b7), or on the deepest tap itself (its output is then the deep head's map)
    "stage1.ibm_at": ("before_deepest_stage", one_of("before_deepest_stage", "deepest_tap")),
    "stage1.ibm_edge_from": ("input", one_of("input", "fused")),  # IBM's edge map: of its input, as published
    "stage1.ibm_lr_mult": (1.0, number(0, 1000, low_open=True)),  # IBM's rate: x1 weights / x2 biases, as published
    "stage1.side_head_lr_mult": (1.0, number(0, 1000, low_open=True)),  # ic1 and ic2, as published: x1 / x2
    "stage1.image_size": (224, SIDE),                 # training tile size (a multiple of a ViT's patch size)
    "stage1.epochs": (10, whole(0, MANY)),            # 0: no training, the run's checkpoint.pth as it is
    "stage1.batch_size": (20, BATCH),
    "stage1.lr": (0.01, RATE),
    "stage1.momentum": (0.0, FRACTION),
    "stage1.weight_decay": (0.0005, FRACTION),
    "stage1.poly_power": (0.9, POLY),
    "stage1.grad_clip": (5.0, number(0, low_open=True)),
    "stage1.lr_mult_new": (10.0, number(0, 1000, low_open=True)),  # the deep head (fc8): x10 weights
    "stage1.freeze_bn": (True, FLAG),
    "stage1.freeze_stem": (True, FLAG),
    "stage1.head_weights": ([0.2, 0.3, 0.5], numbers(WEIGHT, count=3, not_all_zero=True)),
    "stage1.boundary_weight": (0.01, WEIGHT),
    "stage1.embedding_weight": (0.01, WEIGHT),
    "stage1.cam_weights": ([1.0, 1.0, 1.0], numbers(WEIGHT, count=3, not_all_zero=True)),
    "stage1.cam_scales": ([1.0], numbers(number(0, 4, low_open=True), least=1, most=8)),
    "stage1.cam_flip": (True, FLAG),
    "stage1.label_threshold": (0.25, PROBABILITY),   # predicted-label threshold where no image label is known
    "stage1.cam_batch_size": (16, BATCH),
    "stage1.samples": (6, whole(0, 64)),              # images in samples.png
    "stage1.pseudo_mask_fill_holes": ([], names()),   # classes whose enclosed holes are filled in pseudo-masks
    "stage1.stitch_whole_images": (False, FLAG),      # also put the training images back together
    "stage1.cam_refine_iterations": (0, whole(0, 1000)),  # CAM refinement along colour edges (0: off)
    "stage1.cam_refine_dilations": ([1, 2, 4, 8], numbers(whole(1, 256), least=1, most=16)),
    "stage1.cam_refine_colour_scale": (0.3, number(0, 100, low_open=True)),
    "stage1.background_cam_scale": (1.0, number(0, 100, low_open=True)),  # < 1: foreground favoured
    # other stage-1 checkpoints of the same network (other seeds) whose class maps are averaged with this run's
    "stage1.average_cams_with": ([], names(meaning="a list of distinct stage-1 checkpoint files")),
    "stage1.pseudo_mask_ignore_margin": (0.0, FRACTION),  # stitched images: close votes left unlabelled
    # affinity propagation of the stitched images' class maps (AffinityNet-style head on the classifier's taps,
    # then a random walk); its own scores in metrics.json ("refined")
    "stage1.affinity": (False, FLAG),
    "stage1.affinity_radius": (5, whole(2, 20)),          # neighbours closer than this many feature cells
    "stage1.affinity_beta": (8.0, number(0, 64, low_open=True)),  # transition = affinity ** beta
    "stage1.affinity_iterations": (256, whole(1, 4096)),  # random-walk steps
    "stage1.affinity_epochs": (8, whole(1, 1000)),
    "stage1.affinity_lr": (0.001, RATE),
    "stage1.affinity_margin": (0.3, FRACTION),            # sure pixels: best class ahead of the second by this
    "stage1.crf_iterations": (0, whole(0, 100)),          # dense CRF on the stitched images' maps (0: off)
    "stage1.hed_jitter": (0.0, FRACTION),             # stain augmentation (0: off)
    "stage1.color_jitter": (0.0, FRACTION),

    "stage2.encoder": ("resnest200e", TEXT),          # any timm name, hf-hub: names included
    "stage2.encoder_kwargs": ({}, KWARGS),
    "stage2.pretrained": (False, FLAG_OR_PATH),
    "stage2.vit_block": (-1, whole(-1024, 1023)),     # Vision Transformers: the block DPR decodes
    "stage2.encoder_stage": (None, whole(0, 64).or_null()),  # convolutional encoders: the stage decoded
    "stage2.freeze_encoder": (False, FLAG),
    "stage2.frozen_stages": (0, FROZEN),
    "stage2.layer_decay": (1.0, LAYER_DECAY),
    "stage2.grad_checkpointing": (False, FLAG),
    "stage2.crop_size": (224, SIDE),
    "stage2.epochs": (10, whole(0, MANY)),            # 0: only score stage2.init_from
    "stage2.batch_size": (16, whole(2, MANY)),       # BatchNorm of DPR's pooled branch needs two crops
    "stage2.lr": (0.01, RATE),
    "stage2.momentum": (0.9, FRACTION),
    "stage2.weight_decay": (0.0005, FRACTION),
    "stage2.poly_power": (0.9, POLY),
    "stage2.aux_weight": (0.4, WEIGHT),
    "stage2.sync_bn": (False, FLAG),
    "stage2.window": (224, SIDE),
    "stage2.overlap": (0.5, FRACTION),
    "stage2.eval_batch_size": (8, BATCH),
    "stage2.iicb.alpha": (1.0, WEIGHT),
    "stage2.iicb.beta": (0.2, WEIGHT),
    "stage2.iicb.gamma": (0.1, WEIGHT),
    "stage2.iicb.delta": (0.1, WEIGHT),
    "stage2.iicb.eta": (0.1, WEIGHT),
    "stage2.iicb.tau": (0.4, FRACTION),
    # published: smoothness = vertical mean + horizontal mean, compactness = per-element variances summed over the
    # classes / C^2; per_term_mean: the mean over all neighbour pairs, the mean trace over the classes present
    "stage2.iicb.scaling": ("published", one_of("published", "per_term_mean")),
    # the cross-entropy term's pixels: all alike, or OEEM's online easy-example weights (the easy ones weigh more)
    "stage2.iicb.pixel_weighting": ("none", one_of("none", "oeem")),
    "stage2.init_from": (None, PATH_OR_NULL),
    "stage2.encoder_from_stage1": (False, FLAG_OR_PATH),  # true: this run's stage-1 checkpoint, or a file
    "stage2.train_masks": ("pseudo", one_of("pseudo", "ground_truth")),
    "stage2.max_train_images": (None, whole(1, MANY).or_null()),
    "stage2.accept_foreign_pseudo_masks": (False, FLAG),
    "stage2.refinement_attention": (True, FLAG),      # DPR's attention on the class logits (false: ablation)
    "stage2.refinement_hidden": (None, whole(1, 4096).or_null()),  # its channel MLP's width (null: classes // 16,
                                                      # at least 1, as published; 8 before it was a setting)
    "stage2.refinement_gate_scale": (1.0, number(0, 10, low_open=True)),  # gate = scale * sigmoid (2: starts near 1)
    "stage2.aux_path": (True, FLAG),                  # DPR's auxiliary path and its loss (false: ablation)
    "stage2.train_on": ("patches", one_of("patches", "whole_images")),
    "stage2.crops_per_image": (1, whole(1, 1000)),
    "stage2.tta_flip": (False, FLAG),
    "stage2.ema_decay": (0.0, FRACTION),              # moving average of the weights (0: off), e.g. 0.999
    "stage2.keep_epoch": ("best_val", one_of("best_val", "last")),
    # self-training: rounds of stage 2, each after the first learning afresh from the previous round's masks of the
    # training images (pixels under relabel_confidence unlabelled; classes the tiles' labels lack kept out)
    "stage2.rounds": (1, whole(1, 20)),
    "stage2.round_epochs": (None, whole(1, MANY).or_null()),  # epochs of the rounds after the first (null: epochs)
    "stage2.relabel_confidence": (0.0, FRACTION),
    "stage2.relabel_with_labels": (True, FLAG),
    "stage2.hed_jitter": (0.0, FRACTION),
    "stage2.color_jitter": (0.0, FRACTION),
    "stage2.scale_jitter": (0.0, FRACTION),           # image and mask resized by U(1 - s, 1 + s) (0: off)
    "stage2.rotate90": (False, FLAG),                 # with the flips, all 8 right-angle rotations and mirrorings

    "inference.batch_size": (16, BATCH),              # run_pipeline.py's inference step
    "inference.window": (None, SIDE.or_null()),       # null: the checkpoint's (stage2.window)
    "inference.overlap": (None, FRACTION.or_null()),  # null: the checkpoint's (stage2.overlap)
}
FREE_MAPPINGS = tuple(key for key, (_, allowed) in SETTINGS.items() if allowed in (MAPPING, KWARGS))
MODEL_KWARGS = tuple(key for key, (_, allowed) in SETTINGS.items() if allowed is KWARGS)


def _nest(flat):
    nested = {}
    for dotted, value in flat.items():
        *sections, leaf = dotted.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return nested


DEFAULTS = _nest({key: default for key, (default, _) in SETTINGS.items()})

# Keys of earlier versions, with where their setting lives now.
MOVED = {
    "data.fill_holes": "postprocess.fill_holes (predicted masks, scored beside the raw ones) and/or "
                       "stage1.pseudo_mask_fill_holes (the pseudo-masks stage 2 trains on)",
}
