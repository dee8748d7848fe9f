"""The demo data set: synthetic H&E tiles with gland masks, written as a real data set is laid out,
so every script runs without real data.

The pictures come from utils/data/synthetic_tissue.py; this module draws them for each split and
domain from one seed, so a data set is reproducible byte for byte, and writes, checks and refreshes
the files.
"""
import json
import re
from pathlib import Path

import numpy as np

from utils.config import ConfigError
from utils.data.imageio import list_images, overlay, read_mask, read_rgb, write_palette_png, write_rgb
from utils.data.prepare import label_string
from utils.data.synthetic_tissue import TISSUE_TYPES, render_tissue, render_tissue_types
from utils.files import write_text

TARGET_EXTRA_SHIFT = 1.0             # the second domain is this much further along the shift direction

LABEL_MIN_FRACTION = 0.05            # a class is in a tile's label when it covers more than this
MARKER = ".complete"
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_DEMO_FILE = re.compile(r"^(train|val|test)_\d{4}")


def _render(rng, kind, split, width, height, shift):
    """One image and mask of the demo kind: glands on stroma, or the four tissue types."""
    if kind == "tissue_types":
        regions = int(rng.integers(1, 4)) if split == "train" else int(rng.integers(3, 6))
        return render_tissue_types(rng, width, height, regions)
    return render_tissue(rng, width, height, _tile_kind(rng) if split == "train" else "glands", shift)


# ---------------------------------------------------------------------------------------------- files
def _tile_kind(rng):
    draw = rng.random()
    return "stroma" if draw < 0.28 else ("filled" if draw < 0.42 else "glands")


def _write_domain(root, counts, tile_size, test_size, palette, seed, domain, shift, kind="glands"):
    """Write train/val/test of one domain; returns the set of files written (relative paths)."""
    written = set()
    label_counts = {}
    for split, count in counts.items():
        for index in range(count):
            rng = np.random.default_rng([seed, domain, SPLIT_CODES[split], index])
            stem = f"{split}_{index:04d}"
            if split == "train":
                image, mask = _render(rng, kind, split, tile_size, tile_size, shift)
                label = label_string(mask, len(palette), LABEL_MIN_FRACTION)
                while label is None:  # a tile that is all gap has no label: draw it again
                    image, mask = _render(rng, kind, split, tile_size, tile_size, shift)
                    label = label_string(mask, len(palette), LABEL_MIN_FRACTION)
                label_counts[label] = label_counts.get(label, 0) + 1
                image_name = f"{stem}{label}.png"
            else:
                image, mask = _render(rng, kind, split, test_size[0], test_size[1], shift)
                image_name = f"{stem}.png"
            write_rgb(root / split / "img" / image_name, image)
            write_palette_png(root / split / "mask" / f"{stem}.png", mask, palette)
            written.update({f"{split}/img/{image_name}", f"{split}/mask/{stem}.png"})
    return written, label_counts


def _remove_stale(root, written):
    """Delete demo files of an earlier generation with other settings (only files named like ours)."""
    for split in SPLIT_CODES:
        for kind in ("img", "mask"):
            folder = root / split / kind
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                relative = f"{split}/{kind}/{path.name}"
                if path.is_file() and _DEMO_FILE.match(path.name) and relative not in written:
                    path.unlink()


def write_preview(root, palette, path, count=16, columns=8, background=0):
    """A contact sheet of training tiles above their class overlays, to check the data by eye."""
    root = Path(root)
    tiles = list_images(root / "train" / "img")[:count]
    if not tiles:
        return None
    cells = []
    for tile in tiles:
        image = read_rgb(tile)
        stem = tile.stem.split("[")[0]
        mask = read_mask(root / "train" / "mask" / f"{stem}.png", "index", len(palette))
        cells.append((image, overlay(image, mask, palette, background, alpha=0.55)))
    size = cells[0][0].shape[0]
    blank = np.full((size, size, 3), 255, np.uint8)
    while len(cells) % columns:
        cells.append((blank, blank))
    rows = []
    for start in range(0, len(cells), columns):
        group = cells[start:start + columns]
        for part in (0, 1):
            rows.append(np.concatenate([np.pad(c[part], ((2, 2), (2, 2), (0, 0)), constant_values=255)
                                        for c in group], axis=1))
    write_rgb(path, np.concatenate(rows, axis=0))
    return Path(path)


def target_root(root):
    """The stain-shifted second domain sits beside the main one: <root>_target."""
    root = Path(root)
    return root.parent / f"{root.name}_target"


def _settings(demo_cfg, palette, seed, stain_shift):
    keys = ("train_images", "val_images", "test_images", "tile_size", "test_size", "target_domain")
    settings = {key: demo_cfg[key] for key in keys}
    settings["kind"] = demo_cfg.get("kind", "glands")
    settings["test_size"] = list(settings["test_size"])
    settings.update(stain_shift=float(stain_shift), seed=int(seed), palette=[list(c) for c in palette])
    return settings


def generate_demo_dataset(root, demo_cfg, palette, seed=0, stain_shift=None):
    """Write the synthetic data set under root (and <root>_target when demo_cfg['target_domain'])."""
    root = Path(root)
    shift = float(demo_cfg["stain_shift"] if stain_shift is None else stain_shift)
    tile_size = int(demo_cfg["tile_size"])
    test_size = [int(v) for v in demo_cfg["test_size"]]
    if tile_size < 16 or len(test_size) != 2 or min(test_size) < 16:
        raise ConfigError(f"demo.tile_size ({tile_size}) and demo.test_size ({test_size}, [width, height]) "
                         "must be at least 16 pixels.")
    marker = root / MARKER
    marker.unlink(missing_ok=True)
    counts = {"train": int(demo_cfg["train_images"]), "val": int(demo_cfg["val_images"]),
              "test": int(demo_cfg["test_images"])}
    summary = {"root": str(root), **counts}
    domains = [(root, counts, 0, shift)]
    if demo_cfg["target_domain"]:
        target_counts = {"train": max(1, counts["train"] // 4) if counts["train"] else 0,
                         "val": counts["val"], "test": counts["test"]}
        domains.append((target_root(root), target_counts, 1, shift + TARGET_EXTRA_SHIFT))
        summary["target_root"] = str(target_root(root))
    settings = _settings(demo_cfg, palette, seed, shift)
    # The target domain is finished first, so the main marker vouches for both.
    for folder, domain_counts, domain, domain_shift in reversed(domains):
        (folder / MARKER).unlink(missing_ok=True)
        written, labels = _write_domain(folder, domain_counts, tile_size, test_size, palette, seed, domain,
                                        domain_shift, settings["kind"])
        _remove_stale(folder, written)
        if domain == 0:
            summary["labels"] = labels
            write_preview(folder, palette, folder / "preview.png",
                          background=None if settings["kind"] == "tissue_types" else 0)
        write_text(folder / MARKER, json.dumps({**settings, "domain": domain}, sort_keys=True) + "\n")
    where = f"{root}" + (f" and a stain-shifted copy in {summary['target_root']}" if "target_root" in summary
                         else "")
    print(f"demo data: {counts['train']} train tiles, {counts['val']} val and {counts['test']} test images "
          f"written to {where}")
    return summary


def demo_is_complete(root, demo_cfg, palette, seed):
    """True when root holds a finished demo data set made with these settings."""
    marker = Path(root) / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = {**_settings(demo_cfg, palette, seed, demo_cfg["stain_shift"]), "domain": 0}
    return recorded == expected


def ensure_demo_dataset(cfg):
    """Generate the demo data under cfg.data.root unless a finished one with the same settings is there."""
    root = Path(cfg.data.root)
    if cfg.demo.kind == "tissue_types" and len(cfg.data.classes) != len(TISSUE_TYPES):
        raise ConfigError(f"demo.kind tissue_types draws {len(TISSUE_TYPES)} classes ({', '.join(TISSUE_TYPES)}); "
                          f"data.classes lists {len(cfg.data.classes)}.")
    if demo_is_complete(root, cfg.demo, cfg.data.palette, cfg.seed):
        return root
    generate_demo_dataset(root, cfg.demo, cfg.data.palette, seed=cfg.seed)
    return root


if __name__ == "__main__":
    import argparse

    from utils.settings import DEFAULTS

    parser = argparse.ArgumentParser(description="Write the synthetic demo data set and a preview sheet.")
    parser.add_argument("--root", default=DEFAULTS["data"]["root"], help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    args = parser.parse_args()
    generate_demo_dataset(args.root, DEFAULTS["demo"], DEFAULTS["data"]["palette"], seed=args.seed)
    print(f"preview: {Path(args.root) / 'preview.png'}")
