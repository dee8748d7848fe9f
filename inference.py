"""Segment tiles, large images and whole-slide images with a stage-2 checkpoint.

    python inference.py --checkpoint runs/demo/stage2/best.pth --input DIR_OR_FILE --output DIR

Writes <stem>_mask.png (class indices, palette colours) and <stem>_overlay.png per image; slides are
analysed at the model's own microns per pixel and get a mask at --downsample, an overlay .jpg on the
thumbnail, <stem>.geojson (QuPath annotations, level-0 pixels) and, with --mask-format tiff, a pyramidal
<stem>_mask.tif for slide viewers. summary.csv has one row per input. Under torchrun each process takes its
share of the inputs. Masks are the network's own unless --postprocess applies the checkpoint's
post-processing. With --masks every image is also scored against its labelled mask: per image in
summary.csv, over all in metrics.json.
"""
import argparse
import csv
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from utils.config import ConfigError, load_config
from utils.cuda_graphs import GraphedForward
from utils.data.imageio import IMAGE_SUFFIXES, DataError, overlay, read_rgb, write_palette_png, write_rgb
from utils.data.transforms import normalize_batch
from utils.evaluation.postprocess import describe, fill_holes, fill_holes_with_probabilities
from utils.evaluation.scoring import FolderScore, check_mask_sizes, choose_encoding, find_masks
from utils.files import atomic_path, write_json, write_text
from utils.runtime import cleanup, setup_runtime
from utils.slides.slide import (MPP_TOLERANCE, SLIDE_ONLY_SUFFIXES, Slide, choose_resolution, describe_resolution,
                                is_slide, mask_to_geojson, segment_slide, write_mask_tiff)
from utils.stage2.predict import FlipAveraged, load_segmenter, predict_logits
from utils.stage2.sliding_window import count_windows

SUMMARY = "summary.csv"
# Decoding and encoding release the GIL, so reader and writer threads scale with the cores.
IO_THREADS = min(6, max(4, (os.cpu_count() or 4) // 2))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="stage-2 best.pth or .safetensors")
    parser.add_argument("--input", required=True, help="an image, a slide, or a folder of them")
    parser.add_argument("--output", required=True, help="folder for masks, overlays and summary.csv")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default: 16)")
    parser.add_argument("--window", type=int, help="window size in pixels (default: the checkpoint's)")
    parser.add_argument("--overlap", type=float, help="window overlap in [0, 1) (default: the checkpoint's)")
    parser.add_argument("--save-probs", action="store_true", help="also write an 8-bit probability PNG per class")
    parser.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist")
    parser.add_argument("--recursive", action="store_true", help="also look in subfolders")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--mpp", type=float,
                       help="analyse at this many microns per pixel instead of the model's own (slides, and "
                            "images with --input-mpp)")
    where.add_argument("--level", type=int,
                       help="slides: analyse this OpenSlide level as it is (default: the level nearest the "
                            "model's resolution, at or finer, resized to it)")
    parser.add_argument("--input-mpp", type=float,
                        help="microns per pixel of inputs that do not state their own: plain images, which are "
                             "then resized to the model's resolution for the network (outputs keep their size), "
                             "and slides without an mpp property")
    parser.add_argument("--downsample", type=float, default=8.0,
                        help="slides: level-0 pixels per pixel of the saved mask (default: %(default)s)")
    parser.add_argument("--mask-format", choices=("png", "tiff"), default="png",
                        help="slides: tiff also writes <name>_mask.tif, a tiled pyramidal TIFF of class indices "
                             "with the slide's resolution, which slide viewers overlay (default: png only)")
    parser.add_argument("--no-tta", action="store_true",
                        help="skip the flip test-time augmentation a model trained with stage2.tta_flip uses "
                             "(3x faster, slightly different masks)")
    parser.add_argument("--postprocess", action="store_true",
                        help="apply the post-processing the model's data set defines (e.g. filling glands' "
                             "holes); off by default, so masks are the network's own")
    scoring = parser.add_argument_group("scoring against labelled masks")
    scoring.add_argument("--masks", help="folder of masks named like the inputs: writes metrics.json and "
                                         "per-image scores in summary.csv")
    scoring.add_argument("--mask-suffix", default="", help="mask name ending after the image's stem, e.g. _anno")
    scoring.add_argument("--mask-encoding", default="auto", choices=("auto", "index", "binary255", "instance"),
                         help="how the masks store classes (default: read from their values)")
    scoring.add_argument("--mask-downsample", type=float, default=1.0,
                         help="the masks are this many times smaller than their images (default: 1)")
    return parser


def check_args(parser, args):
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.window is not None and args.window < 8:
        parser.error(f"--window must be at least 8 pixels, got {args.window}.")
    if args.overlap is not None and not 0 <= args.overlap < 1:
        parser.error(f"--overlap must be in [0, 1), got {args.overlap}.")
    if args.mpp is not None and args.mpp <= 0:
        parser.error(f"--mpp must be positive, got {args.mpp}.")
    if args.input_mpp is not None and args.input_mpp <= 0:
        parser.error(f"--input-mpp must be positive, got {args.input_mpp}.")
    if args.downsample < 1:
        parser.error(f"--downsample must be at least 1, got {args.downsample}.")
    if args.mask_downsample < 1:
        parser.error(f"--mask-downsample must be at least 1, got {args.mask_downsample}.")
    if args.masks is None and (args.mask_suffix or args.mask_encoding != "auto" or args.mask_downsample != 1):
        parser.error("--mask-suffix, --mask-encoding and --mask-downsample need --masks.")


@dataclass
class Job:
    index: int
    path: Path
    name: str          # as shown in summary.csv: relative to the input folder
    out_base: Path     # output path without the "_mask.png" etc. suffix
    slide: bool


def find_inputs(input_path, output_dir, recursive):
    """Images and slides to segment, sorted; files inside the output folder are never inputs."""
    input_path = Path(input_path)
    if input_path.is_file():
        return [(input_path, Path(input_path.name))]
    if not input_path.is_dir():
        raise DataError(f"--input {input_path} does not exist; pass an image, a slide or a folder of them.")
    output_dir = Path(output_dir).resolve()
    if output_dir == input_path.resolve():
        raise DataError(f"--output {output_dir} is the input folder; choose a separate folder so that "
                        "outputs are never mistaken for inputs.")
    suffixes = set(IMAGE_SUFFIXES) | set(SLIDE_ONLY_SUFFIXES)
    pattern = "**/*" if recursive else "*"
    found = []
    for path in sorted(input_path.glob(pattern)):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in suffixes:
            continue
        if output_dir in path.resolve().parents:
            continue
        found.append((path, path.relative_to(input_path)))
    if not found:
        raise DataError(f"--input {input_path} holds no images or slides ({', '.join(sorted(suffixes))})"
                        f"{'' if recursive else '; add --recursive to search subfolders'}.")
    return found


def plan_jobs(found, output_dir):
    """One job per input; inputs that would share an output name keep their extension in it."""
    bases = {}
    for _, relative in found:
        key = (relative.parent / relative.stem).as_posix().lower()
        bases[key] = bases.get(key, 0) + 1
    jobs = []
    for index, (path, relative) in enumerate(found):
        clash = bases[(relative.parent / relative.stem).as_posix().lower()] > 1
        stem = relative.name.replace(".", "_") if clash else relative.stem
        jobs.append(Job(index, path, relative.as_posix(), Path(output_dir) / relative.parent / stem, is_slide(path)))
    return jobs


def safe_name(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "class"


def output_paths(job, classes, save_probs, mask_tiff=False):
    base = job.out_base
    paths = {"mask": base.with_name(base.name + "_mask.png"),
             "overlay": base.with_name(base.name + ("_overlay.jpg" if job.slide else "_overlay.png"))}
    if job.slide:
        paths["geojson"] = base.with_name(base.name + ".geojson")
        if mask_tiff:
            paths["mask_tiff"] = base.with_name(base.name + "_mask.tif")
    if save_probs:
        for name in classes:
            paths[f"prob_{name}"] = base.with_name(f"{base.name}_prob_{safe_name(name)}.png")
    return paths


def class_fractions(mask, num_classes):
    mask = np.asarray(mask)
    counts = np.array([np.count_nonzero(mask == index) for index in range(num_classes)])  # 10x bincount's speed
    return counts / max(1, counts.sum())


def write_probabilities(paths, probs, classes):
    """One 8-bit grayscale PNG per class: 255 is probability 1."""
    for name, channel in zip(classes, probs):
        levels = np.clip(np.rint(channel * 255.0), 0, 255).astype(np.uint8)
        with atomic_path(paths[f"prob_{name}"]) as tmp:
            Image.fromarray(levels, mode="L").save(tmp, format="PNG")


def image_zoom(input_mpp, analysis_mpp):
    """Network pixels per image pixel: 1 unless both resolutions are known and differ by more than 1%."""
    if input_mpp is None or analysis_mpp is None:
        return 1.0
    zoom = input_mpp / analysis_mpp
    return 1.0 if abs(zoom - 1) <= MPP_TOLERANCE else zoom


def zoomed(image, zoom):
    """The image resized by `zoom` (area averaging when shrinking), or the image itself at zoom 1."""
    if zoom == 1.0:
        return image
    height, width = image.shape[:2]
    size = (max(1, round(width * zoom)), max(1, round(height * zoom)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR)


def to_size(logits, size):
    """N x C x h x w logits brought to size (H, W): network resolution back to the image's own."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def read_image(path):
    """H x W x 3 uint8. TIFFs go through tifffile first: PIL misreads 16-bit RGB and cannot read float RGB."""
    if Path(path).suffix.lower() in (".tif", ".tiff"):
        try:
            image = _read_tiff(path)
        except Exception:  # compressions or layouts tifffile cannot decode here: PIL may still read them
            image = None
        if image is not None:
            return image
    return read_rgb(path)


def _read_tiff(path):
    """The first page as RGB uint8, or None for layouts better left to PIL (palette, CMYK, ...)."""
    import tifffile
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if page.photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB):
            return None
        array = page.asarray()
        bits = int(page.bitspersample or 0)
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar storage
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        return None
    if array.dtype != np.uint8:
        values = array.astype(np.float64)
        if np.issubdtype(array.dtype, np.integer):
            # by the bit depth (12 bits stored in 16 included), never by the content's own maximum
            depth = bits if 0 < bits <= array.dtype.itemsize * 8 else array.dtype.itemsize * 8
            values *= 255.0 / (2 ** depth - 1)
        elif values.size and float(values[..., :3].max()) <= 1.0:
            values *= 255.0  # floating-point images carry no bit depth: [0, 1] is scaled, [0, 255] kept
        array = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if array.shape[-1] == 4:
        alpha = array[..., 3:].astype(np.float32) / 255.0
        array = np.rint(array[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(array)


@torch.no_grad()
def predict_tile_batch(model, tiles, runtime, window, mean, std, batch_size):
    """Logits (N x C x h x w, float32) for N same-size h x w x 3 uint8 tiles no larger than the window.

    Tiles are padded to the window as sliding-window prediction pads one small image, so batching them
    changes the speed, not the result.
    """
    count = len(tiles)
    batch = torch.from_numpy(np.stack(tiles))
    if runtime.device.type == "cuda" and count < batch_size:
        # one batch shape: no new cuDNN tuning for a short last batch, and the forward pass stays on its graph
        batch = torch.cat([batch, batch[-1:].expand(batch_size - count, -1, -1, -1)])
    batch = normalize_batch(batch.to(runtime.device, non_blocking=True), mean, std)
    height, width = batch.shape[-2:]
    pad_bottom, pad_right = window - height, window - width
    if pad_bottom or pad_right:
        mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"
        batch = F.pad(batch, (0, pad_right, 0, pad_bottom), mode=mode)
    with runtime.autocast():
        logits = model(batch.contiguous(memory_format=torch.channels_last)).float()
    return logits[:count, :, :height, :width]


class Segmenter:
    """The model with its settings; turns inputs into outputs and summary rows."""

    def __init__(self, model, meta, runtime, args):
        # flip test-time augmentation when the model was chosen with it (stage2.tta_flip), unless --no-tta
        self.tta = bool(meta.get("tta_flip")) and not args.no_tta
        model = FlipAveraged(model) if self.tta else model
        self.model, self.runtime, self.args = model, runtime, args
        self.forward = GraphedForward(model, runtime)  # tile batches keep one shape: replayed on CUDA GPUs
        self.classes = list(meta["classes"])
        self.palette = [tuple(int(v) for v in c) for c in meta["palette"]]
        self.mean, self.std = list(meta["mean"]), list(meta["std"])
        self.window = int(args.window or meta["window"])
        self.overlap = float(meta["overlap"] if args.overlap is None else args.overlap)
        self.pending = {}  # (h, w) of the images -> [(job, image, network input, seconds so far)]
        self.model_mpp = meta.get("mpp")  # files from before the setting: unknown
        # the resolution the network sees: --mpp, else the model's own (None: inputs' own pixels)
        self.analysis_mpp = args.mpp if args.mpp is not None else self.model_mpp
        self.zoom = image_zoom(args.input_mpp, self.analysis_mpp)  # plain images: network px per image px
        self.background = meta.get("background", 0)  # files from before the setting: class 0
        # classes whose enclosed holes are filled, only when asked: the main output is the network's own
        self.fill = list(meta.get("fill_holes", [])) if args.postprocess else []
        self.steps = describe(self.classes, self.fill)
        self.scorer, self.masks = None, {}  # set by use_masks
        # PNG encoding and writing run on worker threads while the device predicts the next batch
        self.writer = ThreadPoolExecutor(max_workers=IO_THREADS)
        self.writes = []  # (future, row): a failed write turns its row into an error row

    # ----- rows ---------------------------------------------------------------------------------
    def row(self, job, kind, status, width="", height="", seconds="", fractions=None, downsample="",
            tiles=("", ""), analysis_mpp=None):
        row = {"file": job.name, "kind": kind, "width": width, "height": height, "mask_downsample": downsample,
               "analysis_mpp": "" if analysis_mpp is None else f"{analysis_mpp:.4g}",
               "seconds": seconds if seconds == "" else f"{seconds:.2f}",
               "tiles_predicted": tiles[0], "tiles_total": tiles[1]}
        for index, name in enumerate(self.classes):
            row[f"frac_{name}"] = "" if fractions is None else f"{fractions[index]:.4f}"
        row["status"] = status
        return row

    def columns(self):
        return (["file", "kind", "width", "height", "mask_downsample", "analysis_mpp", "seconds", "tiles_predicted",
                 "tiles_total"]
                + [f"frac_{name}" for name in self.classes] + (self.scorer.columns() if self.scorer else [])
                + ["status"])

    def use_masks(self, scorer, masks):
        """Score every image against its mask (job index -> path) as it is predicted."""
        self.scorer, self.masks = scorer, masks

    def paths(self, job):
        return output_paths(job, self.classes, self.args.save_probs, self.args.mask_format == "tiff")

    def skipped_row(self, job):
        """A row for an input whose outputs exist: fractions from the saved mask, sizes from the input."""
        paths = self.paths(job)
        fractions, width, height, kind = None, "", "", "slide" if job.slide else "image"
        try:
            mask = np.asarray(Image.open(paths["mask"]))
            fractions = class_fractions(mask, len(self.classes))
            if job.slide:
                with Slide(job.path) as slide:
                    width, height = slide.dimensions
            else:  # a plain image's mask has the image's size
                height, width = mask.shape
                kind = "tile" if max(round(width * self.zoom), round(height * self.zoom)) <= self.window else "image"
        except Exception:  # the row is informative only; the outputs already exist
            pass
        return self.row(job, kind, "skipped", width, height, fractions=fractions)

    def error_row(self, job, kind, error):
        message = " ".join(str(error).split()) or type(error).__name__
        return self.row(job, kind, f"error: {message}")

    # ----- plain images -------------------------------------------------------------------------
    def read(self, path):
        """(image, network input): the input is the image resized to the analysis resolution (--input-mpp).
        Runs on a reader thread."""
        image = read_image(path)
        return image, zoomed(image, self.zoom)

    def image_mpp(self):
        """Microns per pixel the network sees in plain images, when known."""
        return None if self.args.input_mpp is None else self.args.input_mpp / self.zoom

    def add_image(self, job, loaded):
        """Predict now (large images) or queue for a batched forward (tiles); returns finished rows.

        `loaded` is the future of self.read(job.path), read ahead on a worker thread. Logits are brought
        back to the image's own size, so masks, probabilities and scores are in the image's pixels.
        """
        start = time.perf_counter()
        try:
            image, network_input = loaded.result()
        except Exception as error:  # any unreadable file becomes an error row, never a crash
            return [self.error_row(job, "image", error)]
        height, width = network_input.shape[:2]
        if height <= self.window and width <= self.window:
            key = image.shape[:2]  # the network input's size follows from the image's
            group = self.pending.setdefault(key, [])
            group.append((job, image, network_input, time.perf_counter() - start))
            rows = self.flush(key) if len(group) >= self.args.batch_size else []
            if sum(len(g) for g in self.pending.values()) > 4 * self.args.batch_size:
                rows += self.flush(max(self.pending, key=lambda k: len(self.pending[k])))
            return rows
        try:
            logits = predict_logits(self.model, network_input, self.runtime, self.window, self.overlap,
                                    self.args.batch_size, self.mean, self.std, len(self.classes))
            masks, raw, fractions, probs = self.decide(to_size(logits, image.shape[:2]))
        except torch.OutOfMemoryError:
            return [self.error_row(job, "image", f"{job.path}: out of memory on {self.runtime.device}; "
                                   "lower --batch-size or use --device cpu.")]
        return [self.finish_image(job, "image", image, (height, width), masks[0], raw[0], fractions[0],
                                  None if probs is None else probs[0], start, time.perf_counter() - start)]

    def flush(self, key):
        group = self.pending.pop(key, [])
        if not group:
            return []
        start = time.perf_counter()
        try:
            logits = predict_tile_batch(self.forward, [network_input for _, _, network_input, _ in group],
                                        self.runtime, self.window, self.mean, self.std, self.args.batch_size)
            masks, raw, fractions, probs = self.decide(to_size(logits, key))
        except torch.OutOfMemoryError:
            return [self.error_row(job, "tile", f"{job.path}: out of memory on {self.runtime.device}; "
                                   "lower --batch-size.") for job, _, _, _ in group]
        share = (time.perf_counter() - start) / len(group)
        return [self.finish_image(job, "tile", image, network_input.shape[:2], masks[i], raw[i], fractions[i],
                                  None if probs is None else probs[i], time.perf_counter(), read_seconds + share)
                for i, (job, image, network_input, read_seconds) in enumerate(group)]

    def decide(self, logits):
        """Class masks (argmax on the device, uint8 to the host) after any post-processing, the masks before it,
        their class fractions and, with --save-probs, probabilities that agree with the masks."""
        predicted = logits.argmax(dim=1)
        num_classes = len(self.classes)
        raw = predicted.to(torch.uint8).cpu().numpy()
        probs = list(torch.softmax(logits, dim=1).cpu().numpy()) if self.args.save_probs else None
        if self.fill:
            if probs is None:
                masks = [fill_holes(m, self.fill) for m in raw]
            else:
                masks, probs = map(list, zip(*[fill_holes_with_probabilities(m, p, self.fill)
                                               for m, p in zip(raw, probs)]))
            fractions = [class_fractions(m, num_classes) for m in masks]
        else:  # pixels per class counted on the device, in one pass for the whole batch
            offsets = torch.arange(len(predicted), device=predicted.device).view(-1, 1, 1) * num_classes
            counts = torch.bincount((predicted + offsets).flatten(), minlength=len(predicted) * num_classes)
            masks = raw
            counts = counts.view(-1, num_classes).cpu().numpy()
            fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        return masks, raw, fractions, probs

    def flush_all(self):
        rows = []
        for key in list(self.pending):
            rows += self.flush(key)
        return rows

    def finish_image(self, job, kind, image, network_size, mask, raw, fractions, probs, write_start, seconds):
        paths = self.paths(job)
        height, width = mask.shape
        windows = count_windows(*network_size, self.window, self.overlap)
        row = self.row(job, kind, "ok", width, height, seconds + time.perf_counter() - write_start,
                       fractions, 1, (windows, windows), self.image_mpp())
        if self.scorer is not None:
            row.update(self.scorer.add(self.masks[job.index], raw, mask if self.fill else None))
        self.writes.append((self.writer.submit(self.write_outputs, job, paths, image, mask, probs), row))
        return row

    def write_outputs(self, job, paths, image, mask, probs):
        """Runs on a worker thread; returns None, or the error for the summary."""
        try:
            if probs is not None:
                write_probabilities(paths, probs, self.classes)
            write_rgb(paths["overlay"], overlay(image, mask, self.palette, self.background))
            write_palette_png(paths["mask"], mask, self.palette)  # last: its presence marks a finished input
        except OSError as error:
            return f"writing outputs for {job.path} failed ({error})."
        return None

    def finish_writes(self):
        """Wait for every queued write; rows of failed writes become error rows."""
        for future, row in self.writes:
            error = future.result()
            if error:
                row["status"] = "error: " + " ".join(error.split())
        self.writes = []
        self.writer.shutdown(wait=True)

    # ----- slides -------------------------------------------------------------------------------
    def run_slide(self, job, position):
        start = time.perf_counter()
        args = self.args
        try:
            with Slide(job.path, fallback_mpp=args.input_mpp) as slide:
                resolution = choose_resolution(slide, args.mpp, args.level, self.model_mpp)
                if slide.mpp is None and args.level is None and self.model_mpp is not None:
                    warn(f"{job.path} does not state its microns per pixel; assumed it was scanned at the "
                         f"model's {self.model_mpp:g} um/px and analysed level 0 as it is (--input-mpp states "
                         "the scan's resolution, --level picks a level)")
                slide_mpp = slide.mpp
                analysis_mpp = None if slide.mpp is None else slide.mpp * resolution.downsample
                where = describe_resolution(slide, resolution)
                bar = tqdm(desc=f"  {job.path.name}, {where}", unit="tile", leave=False, position=position,
                           disable=not self.runtime.is_main)

                def progress(done, total):
                    bar.total = total
                    bar.n = done
                    bar.refresh()

                def predict(images):
                    return predict_tile_batch(self.forward, list(images), self.runtime, self.window,
                                              self.mean, self.std, args.batch_size)

                try:
                    result = segment_slide(slide, predict, len(self.classes), self.window, self.overlap,
                                           args.batch_size, resolution, args.downsample, progress,
                                           workers=IO_THREADS, background=self.background)
                finally:
                    bar.close()
                dimensions = slide.dimensions
                # saved probabilities must agree with the saved mask, also where post-processing changed it
                result.mask, result.probabilities = fill_holes_with_probabilities(result.mask, result.probabilities,
                                                                                  self.fill)
        except (DataError, OSError, MemoryError) as error:
            return self.error_row(job, "slide", error)
        except torch.OutOfMemoryError:
            return self.error_row(job, "slide", f"{job.path}: out of memory on {self.runtime.device}; "
                                  "lower --batch-size.")
        paths = self.paths(job)
        try:
            thumb_mask = np.asarray(Image.fromarray(result.mask).resize(
                (result.thumbnail.shape[1], result.thumbnail.shape[0]), Image.NEAREST))
            write_rgb(paths["overlay"], overlay(result.thumbnail, thumb_mask, self.palette, self.background))
            if args.save_probs:
                write_probabilities(paths, result.probabilities, self.classes)
            geojson = mask_to_geojson(result.mask, self.classes, self.palette, result.mask_downsample, dimensions,
                                      background=self.background)
            write_text(paths["geojson"], _compact_json(geojson))
            if "mask_tiff" in paths:
                write_mask_tiff(paths["mask_tiff"], result.mask,
                                None if slide_mpp is None else slide_mpp * result.mask_downsample)
            write_palette_png(paths["mask"], result.mask, self.palette)  # last: its presence marks a finished slide
        except OSError as error:
            return self.error_row(job, "slide", f"writing outputs for {job.path} failed ({error}).")
        return self.row(job, "slide", "ok", dimensions[0], dimensions[1], time.perf_counter() - start,
                        class_fractions(result.mask, len(self.classes)), f"{result.mask_downsample:g}",
                        (result.tiles_predicted, result.tiles_total), analysis_mpp)


def describe_analysis(args, segmenter, jobs):
    """Where slides and images are analysed, and one warning when the model's resolution is needed but unknown."""
    slides, images = any(job.slide for job in jobs), any(not job.slide for job in jobs)
    unknown = segmenter.model_mpp is None and args.mpp is None
    if slides:
        if args.level is not None:
            where = f"level {args.level} as it is"
        elif args.mpp is not None:
            where = f"{args.mpp:g} um/px (--mpp)"
        elif not unknown:
            where = f"the model's {segmenter.model_mpp:g} um/px"
        else:
            where = "level 0 as it is"
        if args.level is None and not unknown:
            where += " (the nearest level at or finer, tiles resized to match)"
        print(f"slides: analysed at {where}; masks and GeoJSON at downsample {args.downsample:g} "
              "(level-0 pixels per mask pixel)")
    if images and args.input_mpp is not None and not unknown:
        print(f"images: {args.input_mpp:g} um/px (--input-mpp) analysed at {segmenter.analysis_mpp:g} um/px; "
              "outputs keep the images' size")
    if unknown and ((slides and args.level is None) or (images and args.input_mpp is not None)):
        warn(f"{args.checkpoint} does not state the microns per pixel of its training images (data.mpp); assumed "
             "they match the inputs, so every input is analysed at its own pixel size (level 0 of slides); "
             "--mpp or --level choose a resolution")


def warn(message):
    """One line on stderr that leaves progress bars intact."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def _compact_json(obj):
    return json.dumps(obj, separators=(",", ":")) + "\n"


def write_summary(path, columns, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def merge_rank_summaries(output_dir, world_size, columns, order, poll_seconds=2.0):
    """Rank 0: wait for every rank's rows (a file poll, so slow ranks cannot time out a barrier), merge."""
    parts = [output_dir / f"summary.rank{rank}.csv" for rank in range(world_size)]
    while not all(p.is_file() for p in parts):
        time.sleep(poll_seconds)
    rows = []
    for part in parts:
        with open(part, newline="", encoding="utf-8") as handle:
            rows += list(csv.DictReader(handle))
    rows.sort(key=lambda r: order.get(r["file"], len(order)))
    write_summary(output_dir / SUMMARY, columns, rows)
    for part in parts:
        part.unlink()
    return rows


def merge_rank_confusions(output_dir, world_size, scorer):
    """Rank 0: add the other ranks' confusion matrices (their files exist once their summaries do)."""
    for rank in range(1, world_size):
        part = output_dir / f"confusion.rank{rank}.json"
        for key, value in json.loads(part.read_text()).items():
            scorer.confusion[key] += np.asarray(value, dtype=np.int64)
        part.unlink()
    (output_dir / "confusion.rank0.json").unlink(missing_ok=True)


def write_score(output_dir, segmenter, rows, args):
    """metrics.json over every scored image, printed as well."""
    scored = [r["file"] for r in rows if r["status"] == "ok"]
    if not scored:
        print("no image could be scored; see the errors below", file=sys.stderr)
        return
    metrics = segmenter.scorer.metrics(segmenter.steps)
    metrics.update(images=scored, checkpoint=str(args.checkpoint), masks=str(args.masks),
                   mask_encoding=segmenter.scorer.encoding)
    write_json(output_dir / "metrics.json", metrics)
    line = f"scored {len(scored)} image(s): mIoU {metrics['input']['miou']:.4f}, Dice {metrics['input']['mdice']:.4f}"
    if "postprocessed" in metrics:
        cleaned = metrics["postprocessed"]["input"]
        line += f"; with {segmenter.steps}: mIoU {cleaned['miou']:.4f}, Dice {cleaned['mdice']:.4f}"
    print(f"{line} ({output_dir / 'metrics.json'})")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    cfg = load_config(None, [f"device={args.device}"])
    try:
        runtime = setup_runtime(cfg)
    except RuntimeError as error:
        reason = str(error).splitlines()[0].split(";")[0]  # its own advice names a config key, not this flag
        raise ConfigError(f"--device {args.device} cannot be used ({reason}); use --device cpu or auto.") from None
    try:
        return run(args, runtime)
    finally:
        # ranks finish their shares at different times; rank 0 already waits for their summaries by file
        cleanup(runtime, wait_for_all=False)


def run(args, runtime):
    model, meta = load_segmenter(args.checkpoint, runtime.device)
    output_dir = Path(args.output)
    jobs = plan_jobs(find_inputs(args.input, output_dir, args.recursive), output_dir)
    segmenter = Segmenter(model, meta, runtime, args)
    if args.masks:
        masks = find_masks(jobs, args.masks, args.mask_suffix)  # every mask is found before any work starts
        check_mask_sizes(jobs, masks, args.mask_downsample)
        encoding = choose_encoding([masks[job.index] for job in jobs], len(segmenter.classes), args.mask_encoding)
        segmenter.use_masks(FolderScore(segmenter.classes, encoding, postprocessed=bool(segmenter.fill)), masks)
        args.overwrite = True  # every score comes from this run's predictions
        if runtime.is_main:
            print(f"scoring against {args.masks} (mask encoding {encoding}); every input is predicted again")
    rank_summary = output_dir / f"summary.rank{runtime.rank}.csv"
    if runtime.distributed:
        rank_summary.unlink(missing_ok=True)
        runtime.barrier()  # no rank may see another's stale rows from an earlier run
    mine = runtime.shard(jobs)
    if runtime.is_main:
        print(f"{len(jobs)} input(s) -> {output_dir}; window {segmenter.window}, overlap {segmenter.overlap}, "
              f"{'flip test-time augmentation, ' if segmenter.tta else ''}device {runtime.device}"
              + (f", {runtime.world_size} processes" if runtime.distributed else ""))
        if args.postprocess and not segmenter.fill:
            print(f"--postprocess: {args.checkpoint} defines no post-processing (postprocess in its data set's "
                  "YAML); masks are the network's own")
        print("post-processing: " + (segmenter.steps if segmenter.fill else "none (the network's own masks)"))
        describe_analysis(args, segmenter, jobs)

    rows = []
    bar = tqdm(total=len(mine), desc="inference", unit="file", disable=not runtime.is_main)
    todo = [job for job in mine if args.overwrite or not all(p.is_file() for p in segmenter.paths(job).values())]
    waiting = {job.index for job in todo}
    for job in mine:
        if job.index not in waiting:
            rows.append(segmenter.skipped_row(job))
            bar.update(1)
    with ThreadPoolExecutor(max_workers=IO_THREADS) as readers:
        images = [job for job in todo if not job.slide]
        ahead = 4 * args.batch_size + IO_THREADS  # images decoded ahead of the device, bounded for memory
        loading = {job.index: readers.submit(segmenter.read, job.path) for job in images[:ahead]}
        next_to_load = len(loading)
        for job in todo:
            if job.slide:
                finished = [segmenter.run_slide(job, position=1)]
            else:
                if next_to_load < len(images):
                    upcoming = images[next_to_load]
                    loading[upcoming.index] = readers.submit(segmenter.read, upcoming.path)
                    next_to_load += 1
                finished = segmenter.add_image(job, loading.pop(job.index))
            rows += finished
            bar.update(len(finished))
    rows += segmenter.flush_all()
    segmenter.finish_writes()
    bar.update(len(mine) - bar.n)
    bar.close()

    columns = segmenter.columns()
    if runtime.distributed:
        if segmenter.scorer is not None:  # before the summary, whose presence tells rank 0 this rank is done
            write_json(output_dir / f"confusion.rank{runtime.rank}.json",
                       {key: value.tolist() for key, value in segmenter.scorer.confusion.items()})
        write_summary(rank_summary, columns, rows)
        if not runtime.is_main:
            return 1 if any(r["status"].startswith("error") for r in rows) else 0
        rows = merge_rank_summaries(output_dir, runtime.world_size, columns, {j.name: j.index for j in jobs})
        if segmenter.scorer is not None:
            merge_rank_confusions(output_dir, runtime.world_size, segmenter.scorer)
    else:
        order = {job.name: job.index for job in jobs}
        rows.sort(key=lambda r: order[r["file"]])
        write_summary(output_dir / SUMMARY, columns, rows)

    if segmenter.scorer is not None:
        write_score(output_dir, segmenter, rows, args)
    failed = [r for r in rows if r["status"].startswith("error")]
    skipped = sum(r["status"] == "skipped" for r in rows)
    print(f"{len(rows) - len(failed) - skipped} done, {skipped} skipped (outputs exist; --overwrite redoes "
          f"them), {len(failed)} failed; see {output_dir / SUMMARY}")
    for row in failed:
        print(f"  {row['file']}: {row['status']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from utils.cli import run_main
    run_main(main, sys.argv[1:])
