"""Raw images with pixel masks -> the layout the numbered scripts read.

Training images become overlapping square patches named with their image-level labels
(`train/img/<stem>_<y>_<x>[1, 0].png`, where y, x are the pixel row and column of the patch's top-left
corner), with the patch masks beside them in train/mask/ for scoring pseudo-masks only. Validation and
test images are copied whole with their masks. Every mask written holds class indices (palette PNG).

An image smaller than a patch is padded at the bottom/right with white; the padding is marked
"ignore" (255) in the patch mask and does not count towards the label, so a label only ever says what
the real tissue shows.

Two raw layouts:
- glas: one flat folder with train_*, testA_*, testB_* images and `<name>_anno` masks (PNG 0/255 or the
  official BMP instance maps; any value > 0 is gland). Test A goes to test/ and Test B to test_b/: the
  two are scored and reported apart.
- generic: train/, optional val/ and test/ folders of images with `<stem><prepare.raw_mask_suffix>` masks
  decoded with prepare.raw_mask_encoding.

Re-running with the same settings rewrites nothing; files left by a run with other settings are an error
unless `overwrite` is set, in which case they are removed.
"""
import csv
import io
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.data.imageio import (IGNORE_INDEX, DataError, decode_mask, image_size, list_images, palette_image,
                                read_mask_raw, read_rgb)
from utils.files import atomic_path, write_text
from utils.provenance import hardware

GLAS_MASK_SUFFIX = "_anno"
GLAS_TRAIN_PREFIX = "train_"
GLAS_TEST_SPLITS = {"test": "testA_", "test_b": "testB_"}   # output split: raw file-name prefix
OUTPUT_FOLDERS = ("train/img", "train/mask", "val/img", "val/mask", "test/img", "test/mask", "test_b/img",
                  "test_b/mask")
SUMMARY_FILE = "prepare_summary.json"


@dataclass
class RawPair:
    image: Path
    mask: Path
    stem: str


@dataclass
class PatchPlan:
    pair: RawPair
    patches: list = field(default_factory=list)   # (y, x, label string)


def natural_key(text):
    """'train_2' sorts before 'train_10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def patch_starts(length, patch_size, stride):
    """Patch offsets along one axis: every `stride`, the last one flush with the border."""
    if length <= patch_size:
        return [0]
    starts = list(range(0, length - patch_size + 1, stride))
    if starts[-1] != length - patch_size:
        starts.append(length - patch_size)
    return starts


def label_string(mask, num_classes, min_fraction):
    """'[1, 0]' from a class-index mask: a class is present above min_fraction of the non-ignored pixels.

    Returns None when the patch has no labelled pixel or no class passes the threshold.
    """
    valid = mask[mask != IGNORE_INDEX]
    if valid.size == 0:
        return None
    counts = np.bincount(valid.ravel(), minlength=num_classes)[:num_classes]
    present = counts > min_fraction * valid.size
    if not present.any():
        return None
    return "[" + ", ".join(str(int(p)) for p in present) + "]"


# ------------------------------------------------------------------------------------------ raw files
def _pairs_in(folder, mask_suffix, prefixes=None):
    """Images of a folder (optionally only names starting with one of prefixes) with their masks."""
    images, masks = {}, {}
    for path in list_images(folder):
        if prefixes is not None and not path.name.startswith(prefixes):
            continue
        if path.stem.endswith(mask_suffix):
            masks.setdefault(path.stem[: -len(mask_suffix)], []).append(path)
        else:
            images.setdefault(path.stem, []).append(path)
    pairs = []
    for stem in sorted(images, key=natural_key):
        for group in (images[stem], masks.get(stem, [])):
            if len(group) > 1:
                raise DataError(f"{group[0].parent}: {', '.join(p.name for p in group)} share one name; keep one "
                                "of them.")
        if stem not in masks:
            raise DataError(f"{images[stem][0]}: no mask {stem}{mask_suffix}.png (or .bmp, .tif) beside it; add "
                            "the mask or move the image out of the raw folder.")
        pairs.append(RawPair(images[stem][0], masks[stem][0], stem))
    return pairs


def _read_groups(path, column, stems):
    """{image stem: group} from a CSV whose first column names the images and `column` their group."""
    if not path.is_file():
        raise DataError(f"prepare.val_groups: {path} does not exist; name a CSV in the raw folder, or set "
                        "prepare.val_groups to null.")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle) if row]
    header = [name.strip() for name in rows[0]] if rows else []
    if column not in header:
        raise DataError(f"{path}: no column '{column}' (prepare.val_group_column); its columns are "
                        f"{', '.join(header) or 'none'}.")
    at = header.index(column)
    groups = {row[0].strip(): row[at].strip() for row in rows[1:] if len(row) > at}
    missing = [stem for stem in stems if stem not in groups]
    if missing:
        raise DataError(f"{path} names no group for training image {missing[0]}"
                        f"{f' (nor {len(missing) - 1} more)' if len(missing) > 1 else ''}; every training "
                        "image needs a row.")
    return {stem: groups[stem] for stem in stems}


def _whole_groups(stems, group_of, count, rng):
    """Whole groups in seeded random order, each one taken while the total stays within count."""
    members = {}
    for stem in stems:
        members.setdefault(group_of[stem], []).append(stem)
    order = sorted(members)
    rng.shuffle(order)
    chosen, groups = set(), []
    for group in order:
        if len(chosen) + len(members[group]) <= count:
            chosen.update(members[group])
            groups.append(group)
    if not chosen:
        raise DataError(f"every group holds more than prepare.val_count={count} training images; raise "
                        "prepare.val_count to hold out at least one whole group.")
    print(f"validation: {len(chosen)} images of {len(groups)} whole groups ({', '.join(groups)}), "
          f"none of whose images are trained on.")
    return chosen


def _hold_out(pairs, cfg, source, groups_file=None):
    """Split training pairs into (train, val) by prepare.val_images, else prepare.val_count by seed: single
    images, or whole groups (patients) when groups_file names them."""
    wanted = list(cfg.prepare.val_images)
    if wanted:
        by_stem = {p.stem: p for p in pairs}
        for stem in wanted:
            if stem not in by_stem:
                raise DataError(f"prepare.val_images: '{stem}' is not a training image in {source}.")
        if len(set(wanted)) >= len(pairs):
            raise DataError(f"prepare.val_images holds every training image in {source}; leave some for training.")
        chosen = set(wanted)
    else:
        count = min(int(cfg.prepare.val_count), max(len(pairs) - 1, 0))
        if count < cfg.prepare.val_count:
            print(f"note: only {len(pairs)} training images in {source}; holding out {count} for validation "
                  f"instead of prepare.val_count={cfg.prepare.val_count}.")
        rng = np.random.default_rng(int(cfg.seed))
        if groups_file is not None and count:
            stems = [p.stem for p in pairs]
            chosen = _whole_groups(stems, _read_groups(groups_file, cfg.prepare.val_group_column, stems), count,
                                   rng)
        else:
            chosen = {pairs[int(i)].stem for i in rng.choice(len(pairs), size=count, replace=False)}
    return [p for p in pairs if p.stem not in chosen], [p for p in pairs if p.stem in chosen]


def find_raw_pairs(cfg, raw_dir):
    """(train, val, {test split: pairs}) lists of RawPair from a raw folder, per prepare.mode."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"raw folder {raw_dir} does not exist; pass the folder with the downloaded images "
                        "as --raw.")
    groups_file = raw_dir / cfg.prepare.val_groups if cfg.prepare.val_groups else None
    if cfg.prepare.mode == "glas":
        train = _pairs_in(raw_dir, GLAS_MASK_SUFFIX, (GLAS_TRAIN_PREFIX,))
        tests = {split: _pairs_in(raw_dir, GLAS_MASK_SUFFIX, (prefix,)) for split, prefix in GLAS_TEST_SPLITS.items()}
        if not train:
            raise DataError(f"raw folder {raw_dir} holds no GlaS training images (train_*.png or .bmp with "
                            "train_*_anno masks).")
        train, val = _hold_out(train, cfg, raw_dir, groups_file)
        return train, val, {split: pairs for split, pairs in tests.items() if pairs}
    suffix = cfg.prepare.raw_mask_suffix
    if not suffix:
        raise DataError("prepare.raw_mask_suffix is empty; masks must be named <stem><suffix>.<ext>, "
                        "e.g. suffix '_mask'.")
    if not (raw_dir / "train").is_dir():
        raise DataError(f"raw folder {raw_dir} has no train/ subfolder; generic mode expects train/, "
                        "optionally val/ and test/.")
    train = _pairs_in(raw_dir / "train", suffix)
    if not train:
        raise DataError(f"{raw_dir / 'train'} holds no images with {suffix} masks.")
    if (raw_dir / "val").is_dir():
        val = _pairs_in(raw_dir / "val", suffix)
    else:
        train, val = _hold_out(train, cfg, raw_dir / "train", groups_file)
    tests = {"test": _pairs_in(raw_dir / "test", suffix)} if (raw_dir / "test").is_dir() else {}
    return train, val, {split: pairs for split, pairs in tests.items() if pairs}


def _read_class_mask(pair, cfg):
    encoding = "instance" if cfg.prepare.mode == "glas" else cfg.prepare.raw_mask_encoding
    mask = decode_mask(read_mask_raw(pair.mask), encoding, len(cfg.data.classes), pair.mask)
    width, height = image_size(pair.image)
    if mask.shape != (height, width):
        raise DataError(f"{pair.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {pair.image.name} "
                        f"is {width}x{height}; masks must match their images.")
    return mask


def _pad_to(array, height, width, value):
    pad_h, pad_w = max(height - array.shape[0], 0), max(width - array.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return array
    padding = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (array.ndim - 2)
    return np.pad(array, padding, constant_values=value)


def _patch_masks(mask, patch_size, stride):
    """(y, x, patch mask) for every patch of an image's mask, padded with ignore where too small."""
    padded = _pad_to(mask, patch_size, patch_size, IGNORE_INDEX)
    for y in patch_starts(mask.shape[0], patch_size, stride):
        for x in patch_starts(mask.shape[1], patch_size, stride):
            yield y, x, padded[y:y + patch_size, x:x + patch_size]


# ------------------------------------------------------------------------------------------- writing
def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _put(path, data):
    """Write bytes atomically unless the file already holds them; True when written."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return True


def _rgb_png(array):
    return _png_bytes(Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)))


def _mask_png(mask, palette):
    return _png_bytes(palette_image(np.ascontiguousarray(mask), palette))


def _write_patches(plan, cfg, out):
    """All patches of one training image; returns how many files were written."""
    patch_size = int(cfg.prepare.patch_size)
    image = _pad_to(read_rgb(plan.pair.image), patch_size, patch_size, 255)
    mask = _pad_to(_read_class_mask(plan.pair, cfg), patch_size, patch_size, IGNORE_INDEX)
    written = 0
    for y, x, label in plan.patches:
        name = f"{plan.pair.stem}_{y}_{x}"
        window = (slice(y, y + patch_size), slice(x, x + patch_size))
        written += _put(out / "train" / "img" / f"{name}{label}.png", _rgb_png(image[window]))
        written += _put(out / "train" / "mask" / f"{name}.png", _mask_png(mask[window], cfg.data.palette))
    return written


def _write_whole(pair, split, cfg, out):
    written = _put(out / split / "img" / f"{pair.stem}.png", _rgb_png(read_rgb(pair.image)))
    mask = _read_class_mask(pair, cfg)
    written += _put(out / split / "mask" / f"{pair.stem}.png", _mask_png(mask, cfg.data.palette))
    return written


def _stale_files(out, expected):
    stale = []
    for folder in OUTPUT_FOLDERS:
        directory = out / folder
        if directory.is_dir():
            stale += [p for p in sorted(directory.iterdir())
                      if p.is_file() and not p.name.startswith(".") and f"{folder}/{p.name}" not in expected]
    return stale


def prepare_dataset(cfg, raw_dir, overwrite=False):
    """Write cfg.data.root from raw_dir (per cfg.prepare) and return the counts."""
    started = time.perf_counter()
    raw_dir, out = Path(raw_dir), Path(cfg.data.root)
    if out.resolve() == raw_dir.resolve():
        raise DataError(f"data.root ({out}) is the raw folder itself; point data.root at a new folder.")
    settings = cfg.prepare
    num_classes, min_fraction = len(cfg.data.classes), float(settings.min_class_fraction)
    patch_size, stride = int(settings.patch_size), int(settings.stride)
    train, val, tests = find_raw_pairs(cfg, raw_dir)
    whole = {"val": val, **tests}   # split: pairs copied whole with their masks

    # Plan every output name first (labels need the masks), so stale files are found before writing.
    plans, expected, skipped = [], set(), 0
    for pair in tqdm(train, desc="reading training masks", unit="image", leave=False):
        plan = PatchPlan(pair)
        for y, x, patch in _patch_masks(_read_class_mask(pair, cfg), patch_size, stride):
            label = label_string(patch, num_classes, min_fraction)
            if label is None:
                skipped += 1
                continue
            plan.patches.append((y, x, label))
            expected.update({f"train/img/{pair.stem}_{y}_{x}{label}.png", f"train/mask/{pair.stem}_{y}_{x}.png"})
        plans.append(plan)
    for split, pairs in whole.items():
        for pair in pairs:
            _read_class_mask(pair, cfg)
            expected.update({f"{split}/img/{pair.stem}.png", f"{split}/mask/{pair.stem}.png"})

    stale = _stale_files(out, expected)
    if stale and not overwrite:
        raise DataError(f"{out} holds {len(stale)} files that this preparation would not write (e.g. "
                        f"{stale[0].relative_to(out)}), left by a run with other settings; rerun with "
                        "--overwrite to remove them, or set data.root to a new folder.")
    for path in stale:
        path.unlink()
    pseudo_masks = out / "train" / "pseudo_mask"
    if stale and pseudo_masks.is_dir():
        print(f"note: {pseudo_masks} was made from the earlier patches; rerun stage 1 to remake it.")

    # PNG encoding dominates and releases the GIL, so threads give a real speed-up.
    jobs = [(_write_patches, (plan, cfg, out)) for plan in plans]
    jobs += [(_write_whole, (pair, split, cfg, out)) for split, pairs in whole.items() for pair in pairs]
    written = 0
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        futures = [pool.submit(function, *arguments) for function, arguments in jobs]
        for future in tqdm(futures, desc="writing patches and images", unit="image"):
            written += future.result()
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, do not go on with the queued images
    labels = {}
    for plan in plans:
        for _, _, label in plan.patches:
            labels[label] = labels.get(label, 0) + 1
    total_files = len(expected)

    counts = {
        "train_images": len(train),
        "patches": sum(len(plan.patches) for plan in plans),
        "skipped_patches": skipped,
        "labels": dict(sorted(labels.items())),
        "val": len(val),
        **{split: len(pairs) for split, pairs in tests.items()},
        "written": written,
        "unchanged": total_files - written,
        "removed": len(stale),
    }
    summary = {"raw": str(raw_dir), "mode": settings.mode, "patch_size": patch_size, "stride": stride,
               "min_class_fraction": min_fraction, "classes": list(cfg.data.classes),
               "val_images": [p.stem for p in val], "patches": counts["patches"], "labels": counts["labels"],
               "val": len(val), **{split: len(pairs) for split, pairs in tests.items()},
               "seconds": round(time.perf_counter() - started, 1), "hardware": hardware()}
    write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")

    histogram = ", ".join(f"{label}: {n}" for label, n in counts["labels"].items())
    held_out = ", ".join(f"{len(pairs)} {split}" for split, pairs in whole.items())
    print(f"prepared {out}: {counts['patches']} training patches from {len(train)} images ({histogram}"
          f"{f'; {skipped} unlabelled patches skipped' if skipped else ''}), whole images: {held_out}; "
          f"{written} files written, {total_files - written} already up to date"
          f"{f', {len(stale)} stale removed' if stale else ''}.")
    if not tests:
        print(f"note: no test images found in {raw_dir}.")
    elif cfg.prepare.mode == "glas" and "test_b" not in tests:
        print(f"note: no Test B images (testB_*) in {raw_dir}; only Test A was prepared (test/).")
    if cfg.data.mask_encoding != "index":
        print(f"note: the prepared masks hold class indices; set data.mask_encoding: index for {out}.")
    return counts
