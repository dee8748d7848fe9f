"""Synthetic H&E-like colon tissue with gland masks, so every script runs without real data.

Tissue is painted as haematoxylin and eosin concentration maps and turned into colour with the
Beer-Lambert law, using stain vectors that vary per image. Stroma is pink and fibrous with scattered
nuclei; a gland is an irregular blob with a pale lumen inside a purple epithelial rim whose basal side
is lined with dark, crowded nuclei. Everything is drawn from one seed, so a data set is reproducible
byte for byte.
"""
import json
import re
from pathlib import Path

import cv2
import numpy as np

from utils.config import ConfigError
from utils.data.imageio import IGNORE_INDEX, list_images, overlay, read_mask, read_rgb, write_palette_png, write_rgb
from utils.data.prepare import label_string
from utils.files import write_text

# Optical densities (R, G, B) of haematoxylin and eosin, after Ruifrok & Johnston.
HAEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286])
EOSIN_OD = np.array([0.072, 0.990, 0.105])
# Direction in which a positive stain shift moves each stain: bluer haematoxylin, paler, more orange eosin.
HAEMATOXYLIN_SHIFT = np.array([0.30, 0.08, -0.12])
EOSIN_SHIFT = np.array([0.0, -0.25, 0.10])
TARGET_EXTRA_SHIFT = 1.0             # the second domain is this much further along the shift direction

LABEL_MIN_FRACTION = 0.05            # a class is in a tile's label when it covers more than this
MARKER = ".complete"
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_DEMO_FILE = re.compile(r"^(train|val|test)_\d{4}")


# ----------------------------------------------------------------------------------------------- noise
def _smooth_noise(rng, height, width, sigma):
    """Gaussian noise blurred to the given scale, rescaled to unit standard deviation."""
    field = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), sigma)
    return field / max(float(field.std()), 1e-6)


def _fibre_field(rng, height, width):
    """Wavy, roughly parallel streaks in [0, 1] like collagen fibres."""
    side = int(np.ceil(np.hypot(height, width))) + 16
    streaks = cv2.GaussianBlur(rng.standard_normal((side, side)).astype(np.float32), (0, 0),
                               sigmaX=rng.uniform(5.0, 9.0), sigmaY=0.8)
    streaks /= max(float(streaks.std()), 1e-6)
    angle = rng.uniform(0, np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys -= height / 2
    xs -= width / 2
    bend = 3.0 * _smooth_noise(rng, height, width, 10.0)
    map_x = (np.cos(angle) * xs + np.sin(angle) * ys + side / 2).astype(np.float32)
    map_y = (-np.sin(angle) * xs + np.cos(angle) * ys + side / 2 + bend).astype(np.float32)
    warped = cv2.remap(streaks, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return 1.0 / (1.0 + np.exp(-1.8 * warped))


# ---------------------------------------------------------------------------------------------- glands
def _random_gland(rng, centre, radius, crowded):
    harmonics = np.arange(2, 7)
    return {
        "centre": np.asarray(centre, dtype=np.float32),
        "radius": float(radius),
        "amplitudes": rng.uniform(0.0, 0.12, len(harmonics)) / np.sqrt(harmonics - 1),
        "phases": rng.uniform(0, 2 * np.pi, len(harmonics)),
        "harmonics": harmonics,
        # Epithelium thickness: thin in small glands, thick and crowded in the large (malignant-looking) ones.
        "rim": float(radius * (rng.uniform(0.5, 0.75) if crowded else rng.uniform(0.45, 0.65))),
        "crowded": crowded,
    }


def _boundary_radius(gland, theta):
    theta = np.asarray(theta)
    wave = np.zeros_like(theta, dtype=np.float32)
    for k, a, p in zip(gland["harmonics"], gland["amplitudes"], gland["phases"]):
        wave = wave + a * np.cos(k * theta + p)
    return gland["radius"] * (1.0 + wave)


def _gland_depth(gland, xs, ys):
    """Distance inside the gland boundary along the ray from its centre (negative outside)."""
    dx, dy = xs - gland["centre"][0], ys - gland["centre"][1]
    return _boundary_radius(gland, np.arctan2(dy, dx)) - np.hypot(dx, dy)


def _place_glands(rng, width, height, count, radius_range, tries=60):
    """Up to `count` glands that do not overlap (their centres may lie near or past the border)."""
    glands = []
    for _ in range(tries):
        if len(glands) == count:
            break
        radius = rng.uniform(*radius_range)
        centre = rng.uniform([-0.15 * width, -0.15 * height], [1.15 * width, 1.15 * height])
        if any(np.hypot(*(centre - g["centre"])) < 1.2 * (radius + g["radius"]) + 3 for g in glands):
            continue
        glands.append(_random_gland(rng, centre, radius, crowded=rng.random() < 0.3))
    return glands


def _layout(rng, kind, width, height):
    """Glands for one canvas: 'stroma' (none or a sliver), 'glands' (a few), 'filled' (one large gland)."""
    if kind == "stroma":
        return _place_glands(rng, width, height, 1, (10, 16)) if rng.random() < 0.2 else []
    if kind == "filled":
        side = min(width, height)
        centre = (width / 2 + rng.uniform(-0.1, 0.1) * width, height / 2 + rng.uniform(-0.1, 0.1) * height)
        return [_random_gland(rng, centre, side * rng.uniform(0.62, 0.9), crowded=True)]
    area = width * height
    count = max(1, int(round(area / 4500 * rng.uniform(0.7, 1.4))))
    return _place_glands(rng, width, height, count, (14, 38))


# ----------------------------------------------------------------------------------------- painting
def _draw_ellipses(canvas, centres, axes, angles, values):
    """Filled anti-aliased ellipses (sub-pixel positions) on a uint8 canvas."""
    scale = 16  # cv2 fixed-point shift of 4 bits
    for (x, y), (a, b), angle, value in zip(centres, axes, angles, values):
        cv2.ellipse(canvas, (int(round(x * scale)), int(round(y * scale))),
                    (max(int(round(a * scale)), 1), max(int(round(b * scale)), 1)), float(angle), 0, 360,
                    int(value), -1, cv2.LINE_AA, 4)


def _epithelial_cells(rng, gland):
    """Nuclei along the basal side of the rim and pale goblet vacuoles nearer the lumen."""
    perimeter = 2 * np.pi * gland["radius"]
    spacing = rng.uniform(2.8, 3.6) if gland["crowded"] else rng.uniform(3.8, 4.8)
    count = max(int(perimeter / spacing), 6)
    theta = np.linspace(0, 2 * np.pi, count, endpoint=False) + rng.uniform(0, 2 * np.pi)
    theta = theta + rng.normal(0, 0.25 / count * 2 * np.pi, count)
    rim = gland["rim"]
    layers = 2 if gland["crowded"] else 1
    nuclei = []
    size = 1.25 if gland["crowded"] else 1.0
    for layer in range(layers):
        axes = np.stack([rng.uniform(2.2, 3.3, count) * size, rng.uniform(1.1, 1.6, count) * size], 1)
        # Keep each nucleus inside the gland outline, its long axis across the epithelium.
        depth = 0.9 * axes[:, 0] + rim * (rng.uniform(0.0, 0.25, count) + 0.3 * layer)
        rho = _boundary_radius(gland, theta) - depth
        centres = gland["centre"] + np.stack([np.cos(theta), np.sin(theta)], 1) * rho[:, None]
        nuclei.append((centres, axes, np.degrees(theta) + rng.normal(0, 12, count),
                       rng.uniform(170, 255, count)))
    goblets = None
    if not gland["crowded"] and rim > 6:
        n = int(perimeter / rng.uniform(4, 7))
        phi = rng.uniform(0, 2 * np.pi, n)
        rho = _boundary_radius(gland, phi) - rim * rng.uniform(0.45, 0.85, n)
        centres = gland["centre"] + np.stack([np.cos(phi), np.sin(phi)], 1) * rho[:, None]
        axes = np.stack([rng.uniform(2.0, 3.2, n), rng.uniform(1.5, 2.4, n)], 1)
        goblets = (centres, axes, np.degrees(phi), rng.uniform(150, 230, n))
    return nuclei, goblets


def _stroma_nuclei(rng, outside, count):
    ys, xs = np.nonzero(outside)
    if len(xs) == 0 or count == 0:
        return None
    pick = rng.integers(0, len(xs), count)
    centres = np.stack([xs[pick], ys[pick]], 1) + rng.uniform(-0.5, 0.5, (count, 2))
    lymphocyte = rng.random(count) < 0.35
    long_axis = np.where(lymphocyte, rng.uniform(1.3, 1.8, count), rng.uniform(1.8, 3.4, count))
    short_axis = np.where(lymphocyte, long_axis * rng.uniform(0.85, 1.0, count), rng.uniform(0.8, 1.3, count))
    values = np.where(lymphocyte, rng.uniform(220, 255, count), rng.uniform(150, 230, count))
    return centres, np.stack([long_axis, short_axis], 1), rng.uniform(0, 180, count), values


def _random_stains(rng, shift):
    """Per-image stain vectors and strengths; `shift` moves them towards the second domain's look."""
    haem = np.clip(HAEMATOXYLIN_OD + rng.normal(0, 0.04, 3) + shift * HAEMATOXYLIN_SHIFT, 0.03, None)
    eosin = np.clip(EOSIN_OD + rng.normal(0, 0.05, 3) + shift * EOSIN_SHIFT, 0.03, None)
    haem_strength = rng.uniform(0.85, 1.2) * (1 + 0.2 * shift)
    eosin_strength = rng.uniform(0.75, 1.2) * max(1 - 0.35 * shift, 0.25)
    return (haem / np.linalg.norm(haem) * haem_strength, eosin / np.linalg.norm(eosin) * eosin_strength)


def render_tissue(rng, width, height, kind, stain_shift=0.0):
    """One synthetic H&E image (H x W x 3 uint8) and its mask (0 background, 1 gland)."""
    glands = _layout(rng, kind, width, height)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    depth = np.full((height, width), -1e3, np.float32)      # inside-distance to the nearest gland boundary
    lumen_depth = np.full((height, width), -1e3, np.float32)
    for gland in glands:
        d = _gland_depth(gland, xs, ys)
        depth = np.maximum(depth, d)
        lumen_depth = np.maximum(lumen_depth, d - gland["rim"])
    lumen_depth = lumen_depth + 1.5 * _smooth_noise(rng, height, width, 2.0)
    mask = (depth > 0).astype(np.uint8)

    def ramp(x, width_px=1.2):
        return np.clip(x / width_px + 0.5, 0.0, 1.0)

    in_gland, in_lumen = ramp(depth), ramp(lumen_depth)
    fine = _smooth_noise(rng, height, width, 0.8)
    # Stroma: eosin along fibres, white clefts where the tissue is loose.
    fibres = _fibre_field(rng, height, width)
    eosin_level = rng.uniform(0.45, 0.7)
    stroma_e = eosin_level * (0.6 + 0.5 * fibres) * (1 + 0.08 * fine)
    stroma_h = 0.03 + 0.03 * fibres
    loose = ramp(_smooth_noise(rng, height, width, 5.0) - rng.uniform(1.0, 1.6), 0.5)
    loose = loose * (1 - fibres)
    stroma_e *= 1 - 0.85 * loose
    stroma_h *= 1 - 0.85 * loose
    # Epithelium: purple-ish cytoplasm; lumen: nearly white with faint mucus.
    cyto_h, cyto_e = rng.uniform(0.3, 0.45), rng.uniform(0.3, 0.5)
    epi_h = cyto_h * (1 + 0.12 * fine)
    epi_e = cyto_e * (1 + 0.12 * fine)
    mucus = np.clip(_smooth_noise(rng, height, width, 1.5), 0, None)
    lumen_h, lumen_e = 0.02 + 0.03 * mucus, 0.04 + 0.08 * mucus
    epi_h = epi_h * (1 - in_lumen) + lumen_h * in_lumen
    epi_e = epi_e * (1 - in_lumen) + lumen_e * in_lumen
    haem = stroma_h * (1 - in_gland) + epi_h * in_gland
    eosin = stroma_e * (1 - in_gland) + epi_e * in_gland

    goblet_canvas = np.zeros((height, width), np.uint8)
    nucleus_canvas = np.zeros((height, width), np.uint8)
    for gland in glands:
        nuclei, goblets = _epithelial_cells(rng, gland)
        if goblets is not None:
            _draw_ellipses(goblet_canvas, *goblets)
        for layer in nuclei:
            _draw_ellipses(nucleus_canvas, *layer)
    outside = depth < -2.0
    density = rng.uniform(0.002, 0.008)
    stroma_cells = _stroma_nuclei(rng, outside, int(rng.poisson(density * outside.sum())))
    if stroma_cells is not None:
        _draw_ellipses(nucleus_canvas, *stroma_cells)
    pale = goblet_canvas.astype(np.float32) / 255 * (1 - in_lumen)
    haem *= 1 - 0.75 * pale
    eosin *= 1 - 0.75 * pale
    nucleus = cv2.GaussianBlur(nucleus_canvas.astype(np.float32) / 255, (0, 0), 0.5)
    chromatin = 1.0 + 0.25 * _smooth_noise(rng, height, width, 0.6)
    haem = haem * (1 - nucleus) + rng.uniform(1.2, 1.7) * chromatin * nucleus
    eosin = eosin * (1 - 0.5 * nucleus)

    haem_vector, eosin_vector = _random_stains(rng, stain_shift)
    optical_density = haem[..., None] * haem_vector + eosin[..., None] * eosin_vector
    background_light = rng.uniform(238, 252)
    rgb = background_light * np.exp(-1.6 * optical_density)
    rgb = cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), rng.uniform(0.45, 0.8))
    rgb += rng.normal(0, rng.uniform(1.5, 3.5), rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mask


# ------------------------------------------------------------------------------- four tissue types
# A second synthetic set with four tissue classes and no background class, like LUAD-HistoSeg and
# BCSS-WSSS: tumour, necrosis, lymphocyte and stroma, with white gaps (glass, clefts) marked ignore (255).
TISSUE_TYPES = ("tumour", "necrosis", "lymphocyte", "stroma")


def _type_nuclei(rng, kind, height, width):
    """Nuclei of one tissue type over the whole canvas: (centres, axes, angles, values) for _draw_ellipses."""
    area = height * width
    if kind == "tumour":       # large, pleomorphic, crowded
        count, long_axis, ratio, values = int(0.012 * area), (2.8, 4.4), (0.55, 0.85), (190, 255)
    elif kind == "lymphocyte":  # small, round, very dense
        count, long_axis, ratio, values = int(0.05 * area), (1.2, 1.7), (0.85, 1.0), (220, 255)
    elif kind == "necrosis":   # karyorrhectic debris: tiny fragments
        count, long_axis, ratio, values = int(0.02 * area), (0.5, 1.1), (0.6, 1.0), (110, 200)
    else:                      # stroma: sparse spindle cells
        count, long_axis, ratio, values = int(0.003 * area), (2.0, 3.4), (0.3, 0.45), (150, 230)
    centres = rng.uniform([0, 0], [width, height], (count, 2))
    long_side = rng.uniform(*long_axis, count)
    axes = np.stack([long_side, long_side * rng.uniform(*ratio, count)], 1)
    return centres, axes, rng.uniform(0, 180, count), rng.uniform(*values, count)


def _type_stains(rng, kind, height, width):
    """Haematoxylin and eosin concentrations of one tissue type's ground substance (no nuclei)."""
    fine = _smooth_noise(rng, height, width, 0.8)
    if kind == "stroma":
        fibres = _fibre_field(rng, height, width)
        return 0.03 + 0.03 * fibres, rng.uniform(0.45, 0.65) * (0.6 + 0.5 * fibres) * (1 + 0.08 * fine)
    if kind == "necrosis":  # pale, smudged eosin with blotches
        blotch = _smooth_noise(rng, height, width, 4.0)
        return 0.05 + 0.02 * fine, rng.uniform(0.3, 0.45) * (1 + 0.3 * blotch) * (1 + 0.1 * fine)
    if kind == "tumour":    # purple cytoplasm
        return rng.uniform(0.25, 0.38) * (1 + 0.12 * fine), rng.uniform(0.25, 0.4) * (1 + 0.12 * fine)
    return 0.1 * (1 + 0.1 * fine), 0.12 * (1 + 0.1 * fine)  # lymphocytes: little between the cells


def render_tissue_types(rng, width, height, regions):
    """One synthetic image with `regions` tissue regions of random types: (H x W x 3 uint8, mask), where the
    mask holds TISSUE_TYPES indices and 255 on white gaps."""
    seeds = rng.uniform([0, 0], [width, height], (regions, 2))
    kinds = rng.integers(0, len(TISSUE_TYPES), regions)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    distance = np.stack([np.hypot(xs - x, ys - y) for x, y in seeds])
    distance += 0.12 * max(width, height) * np.stack([_smooth_noise(rng, height, width, 6.0) for _ in seeds])
    mask = kinds[distance.argmin(axis=0)].astype(np.uint8)
    haem = np.zeros((height, width), np.float32)
    eosin = np.zeros((height, width), np.float32)
    for index, kind in enumerate(TISSUE_TYPES):
        inside = mask == index
        if not inside.any():
            continue
        region_haem, region_eosin = _type_stains(rng, kind, height, width)
        canvas = np.zeros((height, width), np.uint8)
        _draw_ellipses(canvas, *_type_nuclei(rng, kind, height, width))
        nucleus = cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), 0.5)
        strength = rng.uniform(1.2, 1.7) * (0.7 if kind == "necrosis" else 1.0)
        haem = np.where(inside, region_haem * (1 - nucleus) + strength * nucleus, haem)
        eosin = np.where(inside, region_eosin * (1 - 0.5 * nucleus), eosin)
    gaps = _smooth_noise(rng, height, width, 5.0) > rng.uniform(1.6, 2.4)  # clefts and glass: no tissue
    haem[gaps] *= 0.05
    eosin[gaps] *= 0.05
    mask[gaps] = IGNORE_INDEX
    haem_vector, eosin_vector = _random_stains(rng, 0.0)
    optical_density = haem[..., None] * haem_vector + eosin[..., None] * eosin_vector
    rgb = rng.uniform(238, 252) * np.exp(-1.6 * optical_density)
    rgb = cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), rng.uniform(0.45, 0.8))
    rgb += rng.normal(0, rng.uniform(1.5, 3.5), rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mask


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
