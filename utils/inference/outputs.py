"""The files inference writes for each input: their names, and the files themselves (each written atomically;
the mask last, since its presence marks a finished input)."""
import json
import re

import numpy as np
from PIL import Image

from utils.data.imageio import overlay, write_palette_png, write_rgb
from utils.files import atomic_path, write_text
from utils.slides.exports import mask_to_geojson, write_mask_tiff


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


def write_probabilities(paths, probs, classes):
    """One 8-bit grayscale PNG per class: 255 is probability 1."""
    for name, channel in zip(classes, probs):
        levels = np.clip(np.rint(channel * 255.0), 0, 255).astype(np.uint8)
        with atomic_path(paths[f"prob_{name}"]) as tmp:
            Image.fromarray(levels, mode="L").save(tmp, format="PNG")


def compact_json(obj):
    return json.dumps(obj, separators=(",", ":")) + "\n"


def write_image_outputs(segmenter, job, paths, image, mask, probs):
    """A plain image's files; returns None, or the error for the summary. Runs on a worker thread."""
    try:
        if probs is not None:
            write_probabilities(paths, probs, segmenter.classes)
        write_rgb(paths["overlay"], overlay(image, mask, segmenter.palette, segmenter.background))
        write_palette_png(paths["mask"], mask, segmenter.palette)  # last: its presence marks a finished input
    except OSError as error:
        return f"writing outputs for {job.path} failed ({error})."
    return None


def write_slide_outputs(segmenter, paths, result, dimensions, slide_mpp):
    """A slide's files: overlay on its thumbnail, probabilities, GeoJSON in level-0 pixels, the pyramidal TIFF
    when asked, and the mask. Raises OSError when one cannot be written."""
    thumb_mask = np.asarray(Image.fromarray(result.mask).resize(
        (result.thumbnail.shape[1], result.thumbnail.shape[0]), Image.NEAREST))
    write_rgb(paths["overlay"], overlay(result.thumbnail, thumb_mask, segmenter.palette, segmenter.background))
    if segmenter.args.save_probs:
        write_probabilities(paths, result.probabilities, segmenter.classes)
    geojson = mask_to_geojson(result.mask, segmenter.classes, segmenter.palette, result.mask_downsample, dimensions,
                              background=segmenter.background)
    write_text(paths["geojson"], compact_json(geojson))
    if "mask_tiff" in paths:
        write_mask_tiff(paths["mask_tiff"], result.mask,
                        None if slide_mpp is None else slide_mpp * result.mask_downsample)
    write_palette_png(paths["mask"], result.mask, segmenter.palette)  # last: its presence marks a finished slide
