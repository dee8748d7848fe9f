"""Scoring predictions against a folder of labelled masks (a held-out set, another centre's data), with the
same metrics as stage 2, per image and over the whole folder."""
from pathlib import Path

import numpy as np

from utils.data.datasets import check_split_masks
from utils.data.imageio import IGNORE_INDEX, DataError, image_size, read_mask, read_mask_raw
from utils.evaluation.metrics import confusion_matrix, scores

MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


class MaskItem:
    """What check_split_masks needs of a val/test item."""

    def __init__(self, mask):
        self.mask = mask


def find_masks(jobs, mask_dir, suffix=""):
    """{job index: mask path} for every job: `<mask_dir>/<relative folder>/<stem><suffix>.<png|bmp|tif>`."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise DataError(f"--masks {mask_dir} does not exist; pass the folder of masks that belong to --input.")
    found = {}
    for job in jobs:
        if job.slide:
            raise DataError(f"{job.path}: --masks scores plain images; score slides from their exported masks.")
        relative = Path(job.name)
        candidates = [mask_dir / relative.parent / f"{relative.stem}{suffix}{ext}" for ext in MASK_SUFFIXES]
        mask = next((c for c in candidates if c.is_file()), None)
        if mask is None:
            raise DataError(f"{job.path}: no mask {candidates[0]} (or .bmp, .tif) for it; every input needs one "
                            "when --masks is given (--mask-suffix sets a name ending such as _anno).")
        found[job.index] = mask
    return found


def check_mask_sizes(jobs, masks, downsample=1.0):
    """Masks must be their image's size, or that size divided by --mask-downsample."""
    for job in jobs:
        width, height = image_size(job.path)
        expected = (max(1, round(width / downsample)), max(1, round(height / downsample)))
        found = image_size(masks[job.index])
        if tuple(found) != expected:
            hint = "" if downsample == 1 else f" (its image divided by --mask-downsample {downsample:g})"
            raise DataError(f"{masks[job.index]}: mask is {found[0]}x{found[1]} but should be "
                            f"{expected[0]}x{expected[1]}{hint}; masks must match their images (or pass "
                            "--mask-downsample when they are smaller by a fixed factor).")


def choose_encoding(mask_paths, num_classes, requested="auto"):
    """The mask encoding: as asked, or read from the values the masks hold.

    Auto: class indices when the values fit the classes (255 = ignore); 0/255 masks of a two-class model
    are binary255; other non-negative values of a two-class model are instance maps.
    """
    items = [MaskItem(path) for path in mask_paths]
    if requested != "auto":
        check_split_masks(items, requested, num_classes, "--masks", setting="--mask-encoding")
        return requested
    values = set()
    for path in mask_paths:
        values.update(np.unique(read_mask_raw(path)).tolist())
    fits = all(0 <= v < num_classes or v == IGNORE_INDEX for v in values)
    if fits and not (values <= {0, IGNORE_INDEX} and IGNORE_INDEX in values):
        return "index"
    if num_classes == 2 and values <= {0, 255}:
        return "binary255"
    if num_classes == 2 and min(values) >= 0:
        return "instance"
    shown = sorted(values)[:8]
    raise DataError(f"the masks hold values {shown}, which fit none of the encodings for {num_classes} classes; "
                    "pass --mask-encoding index, binary255 or instance.")


def resize_to(mask, shape):
    """A class mask brought to `shape` (height, width) by nearest neighbour."""
    if mask.shape == tuple(shape):
        return mask
    import cv2
    return cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


class FolderScore:
    """Confusion matrices over the scored images, without and with post-processing, and per-image rows."""

    def __init__(self, classes, encoding, postprocessed):
        self.classes, self.encoding = list(classes), encoding
        self.kinds = ("input", "postprocessed") if postprocessed else ("input",)
        self.per_image = {}  # file -> {kind: confusion matrix}: a later run into the folder merges with them

    @property
    def confusion(self):
        """{kind: confusion matrix over every scored image}."""
        size = len(self.classes)
        return {kind: sum((image[kind] for image in self.per_image.values() if kind in image),
                          np.zeros((size, size + 1), np.int64)) for kind in self.kinds}

    def add(self, mask_path, predicted, postprocessed=None, name=None):
        """Scores one image (its summary name `name`); returns its row fields (mIoU, Dice, per-class IoU, Dice)."""
        truth = read_mask(mask_path, self.encoding, len(self.classes))
        raw = confusion_matrix(resize_to(predicted, truth.shape), truth, len(self.classes), count_unclaimed=True)
        image = {"input": raw}
        if postprocessed is not None and "postprocessed" in self.kinds:
            image["postprocessed"] = confusion_matrix(resize_to(postprocessed, truth.shape), truth,
                                                      len(self.classes), count_unclaimed=True)
        self.per_image[name if name is not None else str(mask_path)] = image
        return self.row(raw)

    def row(self, confusion):
        if confusion.sum() == 0:  # an image whose mask is all 'ignore'
            return {key: "" for key in self.columns()}
        values = scores(confusion)
        row = {"miou": f"{values['miou']:.4f}", "mdice": f"{values['mdice']:.4f}"}
        for name, iou, dice in zip(self.classes, values["iou"], values["dice"]):
            row[f"iou_{name}"] = "" if iou is None else f"{iou:.4f}"
            row[f"dice_{name}"] = "" if dice is None else f"{dice:.4f}"
        return row

    def columns(self):
        return ["miou", "mdice"] + [f"{kind}_{name}" for name in self.classes for kind in ("iou", "dice")]

    def metrics(self, steps=""):
        """The metrics.json content: the same fields as stage 2 has per split."""
        result = {"input": scores(self.confusion["input"])}
        if "postprocessed" in self.confusion:
            result["postprocessed"] = {"steps": steps, "input": scores(self.confusion["postprocessed"])}
        return result
