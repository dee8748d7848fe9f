"""Synthetic H&E-like tissue: colon glands on stroma, and four tissue types, each with its mask.

Tissue is painted as haematoxylin and eosin concentration maps and turned into colour with the
Beer-Lambert law, using stain vectors that vary per image. Stroma is pink and fibrous with scattered
nuclei; a gland is an irregular blob with a pale lumen inside a purple epithelial rim whose basal side
is lined with dark, crowded nuclei. Every draw comes from the generator passed in, so a picture is
reproducible from its seed.
"""
import cv2
import numpy as np

from utils.data.imageio import IGNORE_INDEX

# Optical densities (R, G, B) of haematoxylin and eosin, after Ruifrok & Johnston.
HAEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286])
EOSIN_OD = np.array([0.072, 0.990, 0.105])
# Direction in which a positive stain shift moves each stain: bluer haematoxylin, paler, more orange eosin.
HAEMATOXYLIN_SHIFT = np.array([0.30, 0.08, -0.12])
EOSIN_SHIFT = np.array([0.0, -0.25, 0.10])


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
