"""Whole-slide images: reading through OpenSlide, tissue detection, stitching tile logits (exports.py
writes the results as GeoJSON and as a pyramidal TIFF).

Coordinates have three scales: level 0 (the scan), the analysis resolution the network sees (the model's
own microns per pixel by default, or --mpp, or --level) and the mask resolution (the saved class map). Each
is given as a downsample from level 0, so `level0 = analysis_px * analysis_downsample = mask_px * mask_downsample`.
"""
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from utils.data.imageio import IGNORE_INDEX, DataError
from utils.stage2.sliding_window import window_positions, window_weight

SLIDE_ONLY_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TIFF_SUFFIXES = (".tif", ".tiff")
# A tiled TIFF with a single level and sides up to this size is an ordinary image, not a slide.
LARGEST_PLAIN_TIFF = 16384
THUMBNAIL_SIDE = 2048
# Otsu on saturation splits a slide into glass and tissue; clamped so that an all-glass slide finds no
# tissue and an all-tissue slide is not cut in half.
SATURATION_RANGE = (20, 50)
# A level within 1% of the wanted resolution is read as it is: level downsamples of odd-sized pyramids and
# scanners' own micron figures are off by more than that, and the network cannot tell the difference.
MPP_TOLERANCE = 0.01


def import_openslide():
    try:
        import openslide
    except (ImportError, OSError):
        raise DataError("reading whole-slide images needs OpenSlide: "
                        "pip install openslide-python openslide-bin.") from None
    return openslide


def is_slide(path):
    """True for formats only OpenSlide reads, and for pyramidal TIFFs that OpenSlide recognises."""
    suffix = Path(path).suffix.lower()
    if suffix in SLIDE_ONLY_SUFFIXES:
        return True
    if suffix not in TIFF_SUFFIXES:
        return False
    try:
        openslide = import_openslide()
        if openslide.OpenSlide.detect_format(str(path)) is None:
            return False
        with openslide.OpenSlide(str(path)) as slide:
            return slide.level_count > 1 or max(slide.dimensions) > LARGEST_PLAIN_TIFF
    except Exception:  # unreadable or not installed: the plain-image reader reports the problem
        return False


class Slide:
    """An OpenSlide image whose reads return H x W x 3 uint8 with transparent areas made white."""

    def __init__(self, path, fallback_mpp=None):
        """fallback_mpp: microns per pixel to assume when the file does not state its own (--input-mpp)."""
        openslide = import_openslide()
        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(path))
        except Exception as error:
            raise DataError(f"{path}: cannot be opened as a whole-slide image ({error}).") from None
        self.dimensions = tuple(int(v) for v in self._slide.dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        mpp = self._slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        try:
            self.mpp = float(mpp) if mpp else None
        except ValueError:
            self.mpp = None
        if self.mpp is not None and not self.mpp > 0:
            self.mpp = None
        if self.mpp is None:
            self.mpp = fallback_mpp

    def read(self, x, y, level, width, height):
        """Region at level `level` whose top-left corner is (x, y) in level-0 pixels."""
        try:
            region = np.asarray(self._slide.read_region((int(x), int(y)), level, (int(width), int(height))))
        except Exception as error:
            raise DataError(f"{self.path}: reading a region failed ({error}); the file may be truncated.") from None
        return composite_on_white(region)

    def close(self):
        self._slide.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def composite_on_white(rgba):
    if rgba.shape[-1] == 3:
        return rgba
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    alpha = alpha.astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)


def best_level(slide, downsample):
    """The coarsest level that is still at least as fine as `downsample`."""
    fitting = [i for i, d in enumerate(slide.level_downsamples) if d <= downsample * (1 + 1e-6)]
    return fitting[-1] if fitting else 0


@dataclass
class Resolution:
    """Where the network reads: an OpenSlide level and the analysis downsample from level 0."""
    level: int
    downsample: float

    def scale(self, slide):
        """Level pixels per analysis pixel (1 when the level is used as it is)."""
        return self.downsample / slide.level_downsamples[self.level]


def choose_resolution(slide, mpp=None, level=None, model_mpp=None):
    """Where the network reads a slide.

    `level` reads that level as it is. Otherwise the wanted resolution is `mpp` or, by default, the model's
    own (`model_mpp`): the nearest level at or finer than it is read, and tiles are resized to match it
    exactly. With neither, or when the slide does not state its resolution, level 0 is read as it is.
    """
    if level is not None:
        if not 0 <= level < len(slide.level_downsamples):
            raise DataError(f"{slide.path}: --level {level} does not exist; this slide has levels "
                            f"0..{len(slide.level_downsamples) - 1}.")
        return Resolution(level, slide.level_downsamples[level])
    wanted = model_mpp if mpp is None else mpp
    if wanted is None:
        return Resolution(0, 1.0)
    if slide.mpp is None:
        if mpp is not None:
            raise DataError(f"{slide.path}: the slide does not state its microns per pixel (openslide.mpp-x); "
                            "state it with --input-mpp, or use --level instead of --mpp.")
        return Resolution(0, 1.0)  # the caller says what it assumed
    target = wanted / slide.mpp  # below 1 when the model is finer than the scan: tiles are enlarged
    if abs(target - 1) <= MPP_TOLERANCE:
        return Resolution(0, 1.0)
    chosen = best_level(slide, target * (1 + MPP_TOLERANCE))
    native = slide.level_downsamples[chosen]
    downsample = native if abs(native / target - 1) <= MPP_TOLERANCE else target
    return Resolution(chosen, downsample)


def describe_resolution(slide, resolution):
    """'level 1 as it is (0.5 um/px)' or 'level 0 resized 2.48x (0.62 um/px)', for messages."""
    scale = resolution.scale(slide)
    how = "as it is" if abs(scale - 1) <= 1e-6 else (f"shrunk {scale:.3g}x" if scale > 1 else
                                                      f"enlarged {1 / scale:.3g}x")
    where = f"level {resolution.level} {how}"
    return where if slide.mpp is None else f"{where} ({slide.mpp * resolution.downsample:.4g} um/px)"


def read_downsampled(slide, downsample, chunk=2048):
    """The whole slide at `downsample` from level 0, read piecewise so memory stays at the output size."""
    width0, height0 = slide.dimensions
    out_w, out_h = max(1, math.ceil(width0 / downsample)), max(1, math.ceil(height0 / downsample))
    level = best_level(slide, downsample)
    level_ds = slide.level_downsamples[level]
    factor = downsample / level_ds
    step = max(1, int(chunk // max(factor, 1.0)))
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for oy in range(0, out_h, step):
        for ox in range(0, out_w, step):
            ow, oh = min(step, out_w - ox), min(step, out_h - oy)
            lx0, ly0 = round(ox * factor), round(oy * factor)
            lw = max(1, round((ox + ow) * factor) - lx0)
            lh = max(1, round((oy + oh) * factor) - ly0)
            region = slide.read(round(lx0 * level_ds), round(ly0 * level_ds), level, lw, lh)
            if region.shape[:2] != (oh, ow):
                shrink = lw >= ow
                region = cv2.resize(region, (ow, oh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            out[oy:oy + oh, ox:ox + ow] = region
    return out


def detect_tissue(rgb):
    """Boolean tissue mask of a thumbnail: Otsu on HSV saturation, then small specks removed and gaps closed."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    saturation = cv2.GaussianBlur(hsv[..., 1], (5, 5), 0)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = float(np.clip(otsu, *SATURATION_RANGE))
    # Near-black pixels have a meaningless hue/saturation (scanner borders, pen); they are not tissue.
    tissue = ((saturation > threshold) & (hsv[..., 2] > 20)).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    tissue = cv2.morphologyEx(tissue, cv2.MORPH_OPEN, kernel)
    tissue = cv2.morphologyEx(tissue, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(tissue, connectivity=8)
    min_area = max(16, tissue.size // 20000)
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels]


def tile_grid(width, height, window, overlap):
    """Top-left corners (x, y) of overlapping windows covering a width x height image."""
    stride = max(1, int(round(window * (1 - overlap))))
    return [(x, y) for y in window_positions(max(height, window), window, stride)
            for x in window_positions(max(width, window), window, stride)]


def tiles_on_tissue(grid, window, analysis_downsample, tissue, tissue_downsample):
    """The grid tiles whose footprint on the tissue mask holds any tissue."""
    integral = cv2.integral(tissue.astype(np.uint8))
    height, width = tissue.shape
    ratio = analysis_downsample / tissue_downsample
    kept = []
    for x, y in grid:
        x0, y0 = min(width - 1, int(x * ratio)), min(height - 1, int(y * ratio))
        x1 = min(width, max(x0 + 1, math.ceil((x + window) * ratio)))
        y1 = min(height, max(y0 + 1, math.ceil((y + window) * ratio)))
        if integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0] > 0:
            kept.append((x, y))
    return kept


class LogitStitcher:
    """Gaussian-weighted tile logits summed directly at the mask resolution (never at level 0)."""

    def __init__(self, num_classes, mask_size, window, ratio):
        # ratio: mask pixels per analysis pixel; each tile covers a box of `box` mask pixels.
        self.ratio, self.window = ratio, window
        self.box = max(1, int(round(window * ratio)))
        self.width, self.height = mask_size
        pad = self.box + 1
        self.logit_sum = np.zeros((num_classes, self.height + pad, self.width + pad), dtype=np.float32)
        self.weight_sum = np.zeros((self.height + pad, self.width + pad), dtype=np.float32)
        self._weight = None

    def add(self, corners, logits):
        """corners: analysis-pixel (x, y) of each tile; logits: N x C x window x window tensor."""
        logits = logits.float()
        if self._weight is None or self._weight.device != logits.device:
            self._weight = window_weight(self.window, logits.device)
        if logits.device.type == "cpu":
            weighted = self._weighted_on_host(logits.numpy())
        else:  # weighted and shrunk to the mask resolution on the device: less to copy to the host
            weighted = torch.cat([logits * self._weight, self._weight.expand(len(logits), 1, -1, -1)], dim=1)
            if self.box != self.window:
                mode = "area" if self.box < self.window else "bilinear"
                weighted = F.interpolate(weighted, size=(self.box, self.box), mode=mode)
            weighted = weighted.cpu().numpy()
        for (x, y), tile in zip(corners, weighted):
            left, top = int(round(x * self.ratio)), int(round(y * self.ratio))
            self.logit_sum[:, top:top + self.box, left:left + self.box] += tile[:-1]
            self.weight_sum[top:top + self.box, left:left + self.box] += tile[-1]

    def _weighted_on_host(self, logits):
        """The CPU path in NumPy and OpenCV, one thread per call: torch's parallel kernels on arrays this small
        spend more time waking threads than computing, and on a busy machine far more."""
        weight = self._weight.numpy()
        count, channels = logits.shape[:2]
        weighted = np.empty((count, self.box, self.box, channels + 1), dtype=np.float32)
        interpolation = cv2.INTER_AREA if self.box < self.window else cv2.INTER_LINEAR
        for index, tile in enumerate(logits):
            stacked = np.concatenate([tile * weight, weight[None]]).transpose(1, 2, 0)
            weighted[index] = stacked if self.box == self.window else cv2.resize(
                stacked, (self.box, self.box), interpolation=interpolation).reshape(self.box, self.box, -1)
        return weighted.transpose(0, 3, 1, 2)

    def result(self):
        """(logits C x H x W, covered H x W bool); pixels no tile reached have zero logits, covered False."""
        weight = self.weight_sum[:self.height, :self.width]
        covered = weight > 0
        logits = self.logit_sum[:, :self.height, :self.width]
        np.divide(logits, weight, out=logits, where=covered[None])
        return logits, covered


def probabilities(logits, covered, background=0):
    """Softmax over classes; pixels no tile reached (glass) are background with certainty, or have
    probability 0 for every class when the data set has no background class (background None)."""
    shifted = logits - logits.max(axis=0, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=0, keepdims=True)
    shifted[:, ~covered] = 0.0
    if background is not None:
        shifted[background, ~covered] = 1.0
    return shifted


@dataclass
class SlidePrediction:
    probabilities: np.ndarray      # C x H x W float32 at the mask resolution
    mask: np.ndarray               # H x W uint8 class indices
    thumbnail: np.ndarray          # h x w x 3 uint8
    tissue: np.ndarray             # h x w bool, on the thumbnail
    mask_downsample: float         # level-0 pixels per mask pixel
    analysis_downsample: float     # level-0 pixels per network input pixel
    tiles_predicted: int
    tiles_total: int


@dataclass
class TilePlan:
    thumbnail: np.ndarray          # h x w x 3 uint8
    tissue: np.ndarray             # h x w bool, on the thumbnail
    grid: list                     # analysis-pixel corners (x, y) of every window covering the slide
    tiles: list                    # those on tissue: the ones to read and predict


def choose_thumbnail_downsample(slide):
    """About THUMBNAIL_SIDE pixels on the longer side. A level up to 2x coarser is taken as it is: reading a
    finer level whole and shrinking it cost more than the rest of a small slide's start."""
    target = max(1.0, max(slide.dimensions) / THUMBNAIL_SIDE)
    coarser = [d for d in slide.level_downsamples if target <= d <= 2 * target]
    return coarser[0] if coarser else target


def plan_tiles(slide, window, overlap, resolution):
    """Find tissue on a thumbnail and keep the windows that touch it."""
    width0, height0 = slide.dimensions
    thumbnail_downsample = choose_thumbnail_downsample(slide)
    thumbnail = read_downsampled(slide, thumbnail_downsample)
    tissue = detect_tissue(thumbnail)
    analysis_ds = resolution.downsample
    grid = tile_grid(math.ceil(width0 / analysis_ds), math.ceil(height0 / analysis_ds), window, overlap)
    return TilePlan(thumbnail, tissue, grid, tiles_on_tissue(grid, window, analysis_ds, tissue, thumbnail_downsample))


# Neighbouring windows of one row are read as one region, so the pixels they share are read, decoded and
# resized once. At most this many windows a region, so that a batch still keeps several reader threads busy.
RUN_LENGTH = 8


def row_runs(corners, window, longest=RUN_LENGTH):
    """Split corners (in grid order) into runs of windows on one row whose footprints leave no gap."""
    runs = []
    for corner in corners:
        last = runs[-1][-1] if runs else None
        if (last is not None and corner[1] == last[1] and 0 < corner[0] - last[0] <= window
                and len(runs[-1]) < longest):
            runs[-1].append(corner)
        else:
            runs.append([corner])
    return runs


def _read_run(slide, run, resolution, scale, window):
    """The windows of one run, each window x window x 3: one region at the level, resized once to the analysis
    resolution, then cut."""
    (left, top), right = run[0], run[-1][0] + window
    width, height = max(1, round((right - left) * scale)), max(1, round(window * scale))
    region = slide.read(round(left * resolution.downsample), round(top * resolution.downsample),
                        resolution.level, width, height)
    if (width, height) != (right - left, window):
        interpolation = cv2.INTER_AREA if height > window else cv2.INTER_LINEAR
        region = cv2.resize(region, (right - left, window), interpolation=interpolation)
    return [region[:, x - left:x - left + window] for x, _ in run]


def read_tile_batches(slide, tiles, resolution, window, batch_size, workers=4):
    """Yield (corners, N x window x window x 3 uint8) while the next batches are read in threads."""
    scale = resolution.scale(slide)
    batches = [tiles[i:i + batch_size] for i in range(0, len(tiles), batch_size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        upcoming = iter(batches)

        def submit_next():
            batch = next(upcoming, None)
            if batch is not None:
                pending.append((batch, [pool.submit(_read_run, slide, run, resolution, scale, window)
                                        for run in row_runs(batch, window)]))

        for _ in range(2):  # read ahead by one batch: disk and decoding overlap the forward pass
            submit_next()
        while pending:
            batch, futures = pending.popleft()
            submit_next()
            yield batch, np.stack([tile for future in futures for tile in future.result()])


def segment_slide(slide, predict_batch, num_classes, window, overlap, batch_size, resolution,
                  mask_downsample, progress=None, workers=4, background=0):
    """Predict the tissue tiles of a slide and stitch them into a class map at `mask_downsample`.

    predict_batch maps N x window x window x 3 uint8 to N x C x window x window logits; progress, if
    given, is called with (done, total) tile counts. Glass (no tile predicted) is the background class, or
    ignore (255) when background is None.
    """
    width0, height0 = slide.dimensions
    plan = plan_tiles(slide, window, overlap, resolution)
    analysis_ds = resolution.downsample
    mask_size = (max(1, math.ceil(width0 / mask_downsample)), max(1, math.ceil(height0 / mask_downsample)))
    stitcher = LogitStitcher(num_classes, mask_size, window, analysis_ds / mask_downsample)
    done = 0
    for corners, images in read_tile_batches(slide, plan.tiles, resolution, window, batch_size, workers):
        logits = predict_batch(images)
        expected = (len(corners), num_classes, window, window)
        if tuple(logits.shape) != expected:
            raise ValueError(f"the predictor returned logits of shape {tuple(logits.shape)}, expected {expected}.")
        stitcher.add(corners, logits)
        done += len(corners)
        if progress is not None:
            progress(done, len(plan.tiles))
    logits, covered = stitcher.result()
    probs = probabilities(logits, covered, background)
    mask = probs.argmax(axis=0).astype(np.uint8)
    if background is None:
        mask[~covered] = IGNORE_INDEX
    return SlidePrediction(probs, mask, plan.thumbnail, plan.tissue, mask_downsample, analysis_ds, len(plan.tiles),
                           len(plan.grid))
