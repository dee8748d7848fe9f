"""Whole training images put back together from their overlapping patches, with pseudo-masks from the
patches' class maps, so that stage 2 can learn from crops larger than a patch.

Patches are named `<image>_<y>_<x>[labels]` by 0_prepare_data.py, (y, x) being the patch's top-left pixel.
Each patch votes with its class maps (scaled to [0, 1], kept only for the classes its label has; a
single-class patch votes for its class everywhere, as its own pseudo-mask does); a pixel's stitched map is
the mean vote of the labelled patches that cover it, so where one patch covers a pixel alone the stitched
map is that patch's map.
"""
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.data.imageio import (IGNORE_INDEX, DataError, image_size, read_mask, read_rgb, write_palette_png,
                              write_rgb)
from utils.files import BackgroundWriter

PATCH_NAME = re.compile(r"^(?P<image>.+)_(?P<y>\d+)_(?P<x>\d+)$")


def patch_position(stem):
    """(image stem, y, x) of a patch named `<image>_<y>_<x>`, or None."""
    match = PATCH_NAME.match(stem)
    if match is None:
        return None
    return match.group("image"), int(match.group("y")), int(match.group("x"))


def patch_votes(maps, labels):
    """N x C x H x W votes from label-masked maps in [0, 1]: single-class patches vote one-hot."""
    votes = maps.float().clone()
    single = labels.sum(dim=1) == 1
    if single.any():
        one_hot = labels[single].to(votes.dtype)[:, :, None, None].expand(-1, -1, *votes.shape[-2:])
        votes[single] = one_hot
    return votes


def weigh_background(maps, background, background_scale=1.0):
    """C x H x W mean votes with the background vote weighed by background_scale (in place), as in
    cams_to_masks."""
    if background is not None and background_scale != 1.0:
        maps[background] *= background_scale
    return maps


def vote_mask(maps, background):
    """The class with the highest vote of C x H x W maps; where no class has a vote, background, or ignore
    when the data set has none."""
    mask = maps.argmax(axis=0).astype(np.uint8)
    mask[maps.max(axis=0) <= 0] = IGNORE_INDEX if background is None else background
    return mask


def tile_starts(length, tile, stride):
    """Offsets of tiles of `tile` px, `stride` apart, that cover `length` px, the last one flush with the end
    (one tile of the whole length when it is shorter than a tile)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tile_boxes(height, width, tile, overlap=0.5):
    """(y, x, h, w) of the tiles of `tile` = (h, w) px that cover an image, neighbours overlapping by
    `overlap`, as 0_prepare_data.py cuts training patches (112 px at stride 56 for GlaS)."""
    tile_h, tile_w = min(tile[0], height), min(tile[1], width)
    stride_h, stride_w = (max(1, round(side * (1 - overlap))) for side in tile)
    return [(y, x, tile_h, tile_w) for y in tile_starts(height, tile[0], stride_h)
            for x in tile_starts(width, tile[1], stride_w)]


def mean_tile_votes(votes, boxes, height, width):
    """C x H x W mean votes of tiles (N x C x h x w, at boxes (y, x, h, w)); tiles that vote for no class
    are not counted, as in VoteStitcher."""
    total = np.zeros((votes.shape[1], height, width), np.float32)
    counts = np.zeros((height, width), np.float32)
    for tile_votes, (y, x, h, w) in zip(votes, boxes):
        if tile_votes.any():
            total[:, y:y + h, x:x + w] += tile_votes
            counts[y:y + h, x:x + w] += 1.0
    return total / np.maximum(counts, 1.0)[None]


def label_union(labels, boxes, height, width):
    """C x H x W bool: the classes some tile covering each pixel has in its label (labels N x C, 0/1; tiles at
    boxes (y, x, h, w)); every class where no tile covers the pixel. A class no covering tile names is ruled out."""
    allowed = np.zeros((labels.shape[1], height, width), bool)
    covered = np.zeros((height, width), bool)
    for label, (y, x, h, w) in zip(np.asarray(labels, bool), boxes):
        allowed[:, y:y + h, x:x + w] |= label[:, None, None]
        covered[y:y + h, x:x + w] = True
    allowed[:, ~covered] = True
    return allowed


class VoteStitcher:
    """Accumulates patch votes per whole image (numpy, on the host)."""

    def __init__(self, items, num_classes):
        self.num_classes = num_classes
        self.patches = defaultdict(list)      # image stem -> [(item, y, x)]
        for item in items:
            position = patch_position(item.stem)
            if position is None:
                raise DataError(f"{item.image}: stitching whole images needs patch names '<image>_<y>_<x>[labels]' "
                                "as 0_prepare_data.py writes them; set stage1.stitch_whole_images: false.")
            stem, y, x = position
            self.patches[stem].append((item, y, x))
        self.sizes, self.votes, self.counts = {}, {}, {}
        for stem, patches in self.patches.items():
            width, height = 0, 0
            for item, y, x in patches:
                w, h = image_size(item.image)
                width, height = max(width, x + w), max(height, y + h)
            self.sizes[stem] = (height, width)
        self.where = {str(item.image): (stem, y, x) for stem, patches in self.patches.items() for item, y, x in patches}

    def add(self, item, votes):
        """votes: C x h x w for the patch `item` (all zero for a patch whose label names no class)."""
        stem, y, x = self.where[str(item.image)]
        if stem not in self.votes:
            height, width = self.sizes[stem]
            self.votes[stem] = np.zeros((self.num_classes, height, width), np.float32)
            self.counts[stem] = np.zeros((height, width), np.float32)
        h, w = votes.shape[-2:]
        if votes.any():
            self.votes[stem][:, y:y + h, x:x + w] += votes
            self.counts[stem][y:y + h, x:x + w] += 1.0

    def reduce(self, runtime):
        """Sum every rank's votes (each rank saw a share of the patches)."""
        if not runtime.distributed:
            return
        for stem in sorted(self.patches):
            height, width = self.sizes[stem]
            votes = self.votes.get(stem, np.zeros((self.num_classes, height, width), np.float32))
            counts = self.counts.get(stem, np.zeros((height, width), np.float32))
            both = torch.from_numpy(np.concatenate([votes, counts[None]])).to(runtime.device)
            both = runtime.all_reduce_sum(both).cpu().numpy()
            self.votes[stem], self.counts[stem] = both[:-1], both[-1]

    def stitched_maps(self, stem):
        """C x H x W mean votes of one image (zero where no labelled patch covers it)."""
        counts = self.counts[stem]
        return self.votes[stem] / np.maximum(counts, 1.0)[None]

    def weighed_maps(self, stem, background, background_scale=1.0):
        """stitched_maps with the background vote weighed by background_scale, as in cams_to_masks."""
        return weigh_background(self.stitched_maps(stem), background, background_scale)

    def mask(self, stem, background, background_scale=1.0):
        """The whole image's pseudo-mask: the class with the highest weighed mean vote; where no class has a
        vote, background, or ignore when the data set has none."""
        return vote_mask(self.weighed_maps(stem, background, background_scale), background)

    def uncertain(self, stem, margin, background, background_scale=1.0):
        """Where the two highest weighed mean votes differ by less than `margin`: the pixels a pseudo-mask is
        least sure of, those without any vote included (data sets have at least two classes)."""
        second, first = np.sort(self.weighed_maps(stem, background, background_scale), axis=0)[-2:]
        return (first - second) < margin

    def allowed(self, stem):
        """C x H x W bool: the classes the labels of the patches covering each pixel allow (label_union)."""
        patches = self.patches[stem]
        boxes = [(y, x, *read_size(item.image)) for item, y, x in patches]
        return label_union(np.stack([item.label for item, _, _ in patches]), boxes, *self.sizes[stem])

    def image(self, stem):
        """The whole image, put together from its patches' pixels."""
        height, width = self.sizes[stem]
        image = np.full((height, width, 3), 255, np.uint8)
        for item, y, x in self.patches[stem]:
            patch = read_rgb(item.image)
            image[y:y + patch.shape[0], x:x + patch.shape[1]] = patch
        return image

    def ground_truth(self, stem, encoding, num_classes):
        """The whole image's true mask, put together from its patches' masks (ignore where none covers a
        pixel); None when a patch has no mask."""
        height, width = self.sizes[stem]
        mask = np.full((height, width), IGNORE_INDEX, np.uint8)
        for item, y, x in self.patches[stem]:
            if item.mask is None:
                return None
            patch = read_mask(item.mask, encoding, num_classes)
            mask[y:y + patch.shape[0], x:x + patch.shape[1]] = patch
        return mask

    def stems(self):
        return sorted(self.patches)


def read_size(path):
    """(height, width) of an image file, from its header."""
    width, height = image_size(path)
    return height, width


def whole_image_dir(pseudo_mask_folder):
    """Where stitched images and their pseudo-masks live: `<pseudo-mask folder>/whole/{img,mask}`."""
    return Path(pseudo_mask_folder) / "whole"


def write_whole_ground_truth(items, folder, encoding, num_classes, palette):
    """The training images and their true masks put back together from the patches (`folder`/img and
    `folder`/mask), for stage 2 trained on true masks of whole images: the ceiling its pseudo-masks are
    measured against. Images with a patch that has no mask are left out. Returns [(image, mask)] paths."""
    folder = Path(folder)
    stitcher = VoteStitcher(items, num_classes)
    pairs = []
    with BackgroundWriter() as writer:
        for stem in tqdm(stitcher.stems(), desc="whole images with true masks", leave=False):
            mask = stitcher.ground_truth(stem, encoding, num_classes)
            if mask is None:
                continue
            pairs.append((folder / "img" / f"{stem}.png", folder / "mask" / f"{stem}.png"))
            writer.submit(write_rgb, pairs[-1][0], stitcher.image(stem))
            writer.submit(write_palette_png, pairs[-1][1], mask, palette)
    left_out = len(stitcher.stems()) - len(pairs)
    print(f"{len(pairs)} whole training images and their true masks rebuilt from the patches in {folder}"
          + (f" ({left_out} left out: a patch without its mask)" if left_out else ""))
    return pairs
