"""Readers for the data layout: train/img/<stem>[labels].png, {val,test}/img + mask, optional train/mask.

The layout and the label forms are those of ../METHOD.md; every problem a user can cause is a DataError
naming the file.
"""
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils.data.imageio import (IGNORE_INDEX, DataError, decode_mask, image_size, list_images, read_mask, read_mask_raw,
                                read_rgb, refuse_clashes)
from utils.data.transforms import stain_jitter, to_tensor

_LABEL_GROUP = re.compile(r"^(?P<stem>.*)\[(?P<labels>[^\[\]]*)\]$")


def parse_label(filename, num_classes):
    """'a[1, 0].png' -> (stem 'a', array [1, 0]); forms [1, 0], [1,0], [1 0] and [10] are accepted."""
    name = Path(filename).stem
    match = _LABEL_GROUP.match(name)
    if match is None:
        raise DataError(f"{filename}: no image-level label in the file name; name training images like "
                        f"'<stem>[1, 0].png' with one 0/1 digit per class.")
    text = match.group("labels").strip()
    if "," in text:
        tokens = [t.strip() for t in text.split(",")]
    elif " " in text.strip():
        tokens = text.split()
    else:
        tokens = list(text)
    if not tokens or any(t not in ("0", "1") for t in tokens):
        raise DataError(f"{filename}: label [{text}] must hold only 0/1 digits, one per class.")
    if len(tokens) != num_classes:
        raise DataError(f"{filename}: label [{text}] has {len(tokens)} digits but the config has "
                        f"{num_classes} classes.")
    return match.group("stem").rstrip(), np.array([int(t) for t in tokens], dtype=np.float32)


@dataclass
class Item:
    image: Path
    stem: str
    label: np.ndarray = None   # image-level label (train)
    mask: Path = None          # pixel mask (val/test, or train/mask for scoring)


def _require_images(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder {folder} does not exist; see datasets/README.md for the layout.")
    images = list_images(folder)
    if not images:
        raise DataError(f"folder {folder} holds no images (.png, .jpg, .tif, .bmp).")
    return images


def train_items(root, num_classes):
    """Training images with their labels; masks from train/mask/ when present (scoring only)."""
    root = Path(root)
    mask_dir = root / "train" / "mask"
    items = []
    for path in _require_images(root / "train" / "img"):
        stem, label = parse_label(path, num_classes)  # the full path, so that errors say where the file is
        mask = None
        if mask_dir.is_dir():
            for candidate in (mask_dir / f"{stem}.png", mask_dir / f"{path.stem}.png"):
                if candidate.is_file():
                    mask = candidate
                    break
        items.append(Item(path, stem, label, mask))
    refuse_clashes([(item.image, item.stem) for item in items], "their pseudo-masks and masks are found")
    return items


def split_items(root, split, required=True):
    """Whole images with masks of a val/test split; every image must have its mask."""
    root = Path(root)
    folder = root / split / "img"
    if not folder.is_dir() and not required:
        return []
    items = []
    for path in _require_images(folder):
        mask = _find_mask(root / split / "mask", path.stem)
        if mask is None:
            raise DataError(f"{path}: no mask {root / split / 'mask' / (path.stem + '.png')}; every {split} "
                            f"image needs one.")
        # from the headers, so a mismatch stops the run before training rather than at its first evaluation
        _check_same_size(mask, image_size(mask), image_size(path))
        items.append(Item(path, path.stem, None, mask))
    refuse_clashes([(item.image, item.stem) for item in items], "their masks and predictions are found")
    return items


def test_splits(root, names):
    """{split: items} for the held-out test splits that exist under root, and the names that do not."""
    found, missing = {}, []
    for name in names:
        if (Path(root) / name / "img").is_dir():
            found[name] = split_items(root, name)
        else:
            missing.append(name)
    return found, missing


def check_split_masks(items, encoding, num_classes, split, setting="data.mask_encoding"):
    """Read every mask of a val/test split once, before any work: values outside the classes stop the run,
    and so does a split of 0/255 masks read as class indices, which would score as if perfect (every
    foreground pixel would be 'ignore')."""
    only_0_255, any_255 = bool(items), False
    for item in items:
        raw = read_mask_raw(item.mask)
        values = np.unique(raw)
        if encoding == "index":
            only_0_255 = only_0_255 and set(values.tolist()) <= {0, IGNORE_INDEX}
            any_255 = any_255 or IGNORE_INDEX in values
        decode_mask(values, encoding, num_classes, item.mask)
    if encoding == "index" and only_0_255 and any_255:
        raise DataError(f"{Path(items[0].mask).parent}: every {split} mask holds only the values 0 and 255, which "
                        f"{setting} 'index' reads as background and 'ignore', so every foreground pixel would go "
                        f"unscored; set {setting} to binary255 (or instance), or prepare the data with "
                        "0_prepare_data.py.")


def median_image_size(paths):
    """(width, height): the median over images, from their file headers."""
    sizes = np.array([image_size(path) for path in paths])
    return int(np.median(sizes[:, 0])), int(np.median(sizes[:, 1]))


def training_tile_size(paths):
    """(height, width) of the training tiles: the most common size (the largest among equals), from the file
    headers, so that mixed sizes give the same answer in any file order."""
    sizes = Counter((height, width) for width, height in (image_size(path) for path in paths))
    return max(sizes, key=lambda size: (sizes[size], size))


def _check_same_size(mask_path, mask_size, image_size):
    """Sizes as (width, height)."""
    if tuple(mask_size) != tuple(image_size):
        raise DataError(f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image is "
                        f"{image_size[0]}x{image_size[1]}; masks must match their images.")


def _find_mask(folder, stem):
    for suffix in (".png", ".bmp", ".tif", ".tiff"):
        candidate = Path(folder) / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_pair(item, encoding, num_classes):
    """Image (H x W x 3 uint8) and its class-index mask, checked to be the same size."""
    image = read_rgb(item.image)
    mask = read_mask(item.mask, encoding, num_classes)
    _check_same_size(item.mask, mask.shape[::-1], image.shape[1::-1])
    return image, mask


def augmentation_rng(seed, key):
    """The random generator of one sample: `key` is an index, or (epoch, index) from EpochSampler.

    Seeded by (seed, epoch, index) alone, so augmentation is the same with any number of loader workers or
    processes, with workers kept between epochs, and after --resume.
    """
    epoch, index = key if isinstance(key, tuple) else (0, key)
    return np.random.default_rng([seed, epoch, index]), index


class EpochSampler(DistributedSampler):
    """This process's share of a shuffled order seeded by (seed, epoch); yields (epoch, index) pairs."""

    def __init__(self, dataset, runtime, seed):
        super().__init__(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True, seed=seed,
                         drop_last=runtime.distributed)

    def __iter__(self):
        return ((self.epoch, index) for index in super().__iter__())


def training_loader(dataset, per_rank_batch, runtime, seed):
    """Shuffled batches of this process's share; call `loader.sampler.set_epoch(epoch)` before each epoch."""
    from utils.runtime import loader_options
    drop_last = len(dataset) // runtime.world_size >= per_rank_batch
    # A generator of its own: seeding loader workers must not move the global one that dropout draws from,
    # or a resumed run would drop out differently from an uninterrupted one.
    return DataLoader(dataset, batch_size=per_rank_batch, sampler=EpochSampler(dataset, runtime, seed),
                      drop_last=drop_last, generator=torch.Generator().manual_seed(seed),
                      **loader_options(runtime, train=True))


class ClassificationSet(Dataset):
    """Stage 1: image resized to a square, random flips (and stain jitter), image-level label."""

    def __init__(self, items, image_size, mean, std, augment, seed=0, jitter=(0.0, 0.0)):
        self.items, self.image_size, self.mean, self.std, self.augment = items, image_size, mean, std, augment
        self.seed, self.jitter = seed, tuple(jitter)  # (hed, colour) strengths for stain_jitter

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        import cv2
        rng, index = augmentation_rng(self.seed, key)
        item = self.items[index]
        image = read_rgb(item.image)
        if image.shape[0] != self.image_size or image.shape[1] != self.image_size:
            image = cv2.resize(image, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
        if self.augment:
            if rng.random() < 0.5:
                image = image[:, ::-1]
            if rng.random() < 0.5:
                image = image[::-1]
            image = stain_jitter(image, rng, *self.jitter)
        return to_tensor(image, self.mean, self.std), torch.from_numpy(item.label), index


class SegmentationSet(Dataset):
    """Stage 2: image + (pseudo or true) class-index mask, random crop of crop_size (padded with ignore)."""

    def __init__(self, images, masks, crop_size, mean, std, encoding, num_classes, augment=True, seed=0,
                 jitter=(0.0, 0.0), crops_per_image=1, scale_jitter=0.0, rotate90=False):
        self.images, self.masks, self.seed, self.jitter = images, masks, seed, tuple(jitter)
        self.scale_jitter, self.rotate90 = scale_jitter, rotate90
        self.crops_per_image = crops_per_image  # an epoch visits each image this many times
        self.crop_size, self.mean, self.std = crop_size, mean, std
        self.encoding, self.num_classes, self.augment = encoding, num_classes, augment

    def __len__(self):
        return len(self.images) * self.crops_per_image

    def __getitem__(self, key):
        from utils.data.transforms import random_crop_pair, random_scale_pair
        rng, index = augmentation_rng(self.seed, key)
        index //= self.crops_per_image
        image = read_rgb(self.images[index])
        mask = read_mask(self.masks[index], self.encoding, self.num_classes)
        if mask.shape != image.shape[:2]:
            raise DataError(f"{self.masks[index]}: mask size {mask.shape[::-1]} differs from its image "
                            f"{image.shape[1::-1]}.")
        if self.augment:
            image, mask = random_scale_pair(image, mask, rng, self.scale_jitter)
        image, mask = random_crop_pair(image, mask, self.crop_size, rng, self.augment, self.augment and self.rotate90)
        if self.augment:
            image = stain_jitter(image, rng, *self.jitter)
        return to_tensor(image, self.mean, self.std), torch.from_numpy(mask.astype(np.int64)), index
