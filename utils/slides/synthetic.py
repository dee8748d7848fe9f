"""A generated pyramidal slide for timing whole-slide inference: tissue-shaped regions of a texture on glass,
written tile by tile so that a 40,000 px scan fits in little memory."""
import math
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np


def tissue_layout(size, fraction, rng, cell=64):
    """Where the tissue lies: one value per `cell` level-0 pixels, above 0.5 on tissue. Ellipses of tissue are
    added until they cover `fraction` of the slide."""
    cells = math.ceil(size / cell)
    layout = np.zeros((cells, cells), np.float32)
    while (layout > 0.5).mean() < fraction:
        centre = tuple(int(v) for v in rng.uniform(0.1, 0.9, 2) * cells)
        axes = tuple(int(v) for v in rng.uniform(0.04, 0.12, 2) * cells + 1)
        cv2.ellipse(layout, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    return cv2.GaussianBlur(layout, (0, 0), 1.5)


def level_tiles(height, width, downsample, layout, texture, tile, cell=64, glass=241):
    """Yield the deflate-compressed tiles of one level, row by row, compressed on threads.

    Tissue is the texture repeated (each level holds it area-averaged, so levels agree) wherever the layout
    says tissue; glass elsewhere. Tiles wholly on glass share one compressed tile.
    """
    period = texture.shape[0]
    blank = zlib.compress(np.full((tile, tile, 3), glass, np.uint8).tobytes(), 1)
    steps = np.arange(tile, dtype=np.float32)

    def one(corner):
        x0, y0 = corner
        # layout coordinates of this tile's pixel centres
        xs = ((x0 + steps + 0.5) * downsample / cell - 0.5).astype(np.float32)
        ys = ((y0 + steps + 0.5) * downsample / cell - 0.5).astype(np.float32)
        near = layout[max(0, int(ys[0]) - 1):int(ys[-1]) + 3, max(0, int(xs[0]) - 1):int(xs[-1]) + 3]
        if near.size == 0 or near.max() <= 0.5:
            return blank
        map_x, map_y = np.meshgrid(xs, ys)
        inside = cv2.remap(layout, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) > 0.5
        rows, columns = (y0 + np.arange(tile)) % period, (x0 + np.arange(tile)) % period
        pixels = np.where(inside[..., None], texture[np.ix_(rows, columns)], np.uint8(glass))
        return zlib.compress(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(), 1)

    with ThreadPoolExecutor(8) as pool:
        for y0 in range(0, height, tile):
            yield from pool.map(one, [(x0, y0) for x0 in range(0, width, tile)])


def write_synthetic_slide(path, size, texture, mpp, tissue, tile=256, level_factor=4, seed=0):
    """A pyramidal tiled TIFF that OpenSlide reads like a scanner's file: `size` px square at `mpp` microns
    per pixel, levels `level_factor` times smaller each, about `tissue` of it tissue (a fraction). Tiles are
    made and compressed one at a time, so a 40,000 px slide needs little memory. Returns the tissue fraction."""
    import tifffile
    rng = np.random.default_rng(seed)
    layout = tissue_layout(size, tissue, rng)
    sides = [size]
    while sides[-1] // level_factor >= tile:
        sides.append(sides[-1] // level_factor)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=size * size * 3 > 2 ** 31) as tif:
        for index, side in enumerate(sides):
            downsample = size / side
            small = max(1, round(texture.shape[0] / downsample))
            level_texture = texture if index == 0 else cv2.resize(texture, (small, small), interpolation=cv2.INTER_AREA)
            per_centimetre = 1e4 / (mpp * downsample)
            tif.write(level_tiles(side, side, downsample, layout, level_texture, tile),
                      shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                      compression="zlib", subfiletype=1 if index else 0, metadata=None,
                      resolution=(per_centimetre, per_centimetre), resolutionunit="CENTIMETER")
    return float((layout > 0.5).mean())
