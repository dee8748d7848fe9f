"""Reading images and masks, writing palette PNGs and overlays, all with errors that name the file."""
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.files import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IGNORE_INDEX = 255


class DataError(ValueError):
    """A problem with a user's file; the message names the file and the fix."""


def list_images(folder, recursive=False):
    folder = Path(folder)
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _open(path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot be read as an image ({error}); replace or remove the file.") from None


def read_rgb(path):
    """H x W x 3 uint8. Grayscale, palette, RGBA and 16-bit images are converted, not rejected."""
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / max(float(array.max()), 1.0) if array.max() > 255 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8))
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def read_mask_raw(path):
    """The mask's stored values, H x W integer array (palette PNGs give their indices)."""
    image = _open(path)
    if image.mode in ("RGB", "RGBA"):
        array = np.asarray(image)[..., :3]
        if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
            raise DataError(f"{path}: mask is a colour image; masks must hold class indices "
                            "(grayscale or palette PNG).")
        return array[..., 0].astype(np.int64)
    if image.mode == "LA":
        image = image.getchannel(0)
    return np.asarray(image).astype(np.int64)


def decode_mask(raw, encoding, num_classes, path="mask"):
    """Convert stored mask values to class indices 0..C-1 (255 = ignore) per the YAML's mask encoding."""
    if encoding == "index":
        mask = raw
    elif encoding == "binary255":
        mask = (raw > 127).astype(np.int64)
    elif encoding == "instance":
        mask = (raw > 0).astype(np.int64)
    else:
        raise DataError(f"unknown mask encoding {encoding!r}; use index, binary255 or instance.")
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX) | (mask < 0)
    if bad.any():
        values = sorted(set(np.unique(mask[bad]).tolist()))[:5]
        raise DataError(f"{path}: mask values {values} are outside the {num_classes} classes "
                        f"(0..{num_classes - 1}, 255 = ignore); check data.mask_encoding in the YAML.")
    return mask.astype(np.uint8)


def read_mask(path, encoding, num_classes):
    return decode_mask(read_mask_raw(path), encoding, num_classes, path)


def palette_image(mask, palette):
    """A 'P' mode PIL image holding class indices with the dataset's colours."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    flat = [0] * 768
    for index, colour in enumerate(palette):
        flat[3 * index:3 * index + 3] = [int(c) for c in colour]
    flat[3 * IGNORE_INDEX:3 * IGNORE_INDEX + 3] = [0, 0, 0]
    image.putpalette(flat)
    return image


def write_palette_png(path, mask, palette):
    with atomic_path(path) as tmp:
        palette_image(mask, palette).save(tmp, format="PNG")


def write_rgb(path, array):
    fmt = "JPEG" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(tmp, format=fmt)


def colorize(mask, palette):
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[np.asarray(mask, dtype=np.uint8)]


def overlay(image, mask, palette, alpha=0.45):
    """Blend class colours over the image; background (class 0) and ignore stay as the image."""
    colour = colorize(mask, palette).astype(np.float32)
    blend = image.astype(np.float32) * (1 - alpha) + colour * alpha
    keep = (np.asarray(mask) == 0) | (np.asarray(mask) == IGNORE_INDEX)
    blend[keep] = image[keep]
    return np.clip(blend, 0, 255).astype(np.uint8)
