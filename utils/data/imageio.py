"""Reading images and masks, writing palette PNGs and overlays, all with errors that name the file."""
import os
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.files import atomic_path

# Images are decoded and encoded on many loader processes and I/O threads at once; OpenCV's own thread
# pool on top of those only oversubscribes the cores.
cv2.setNumThreads(1)
try:  # a damaged file is reported once, by PIL, as a DataError naming it; not also by OpenCV's log
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
except AttributeError:  # OpenCV builds without the logging module
    pass

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IGNORE_INDEX = 255


class DataError(ValueError):
    """A problem with a user's file; the message names the file and the fix."""


def printable(path):
    """A path as text that can always be printed and written: bytes of a file name that are not UTF-8 (which
    Python carries as lone surrogates) shown as \\xNN escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def check_name_encoding(path):
    """A file name must be UTF-8 text: outputs, CSV and JSON name inputs by it."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{printable(path)}: the file name is not valid UTF-8 text (written in another encoding); "
                        "rename the file.") from None
    return path


def refuse_clashes(named, what):
    """Stop when two inputs would share a name. `named`: (path, the name its outputs are known by) pairs, names
    compared without regard to case (which macOS and Windows ignore); `what` says what goes by the name."""
    seen = {}
    for path, name in named:
        other = seen.setdefault(str(name).casefold(), path)
        if other != path:
            raise DataError(f"{printable(Path(other).parent)}: {printable(Path(other).name)!r} and "
                            f"{printable(Path(path).name)!r} share the name {printable(name)!r}, by which {what}; "
                            "rename or remove one of them.")


def list_images(folder, recursive=False):
    folder = Path(folder)
    pattern = "**/*" if recursive else "*"
    return sorted(check_name_encoding(p) for p in folder.glob(pattern) if p.is_file()
                  and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _open(path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot be read as an image ({error}); replace or remove the file.") from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST_PNG_MAX_PIXELS = 1 << 26  # larger images go through PIL and its decompression-bomb limits


def _read_rgb_png_fast(path):
    """8-bit RGB PNGs decoded by OpenCV, which holds no GIL while decoding (reader threads run in parallel).

    None for anything else (other formats, grey, palette, alpha, 16-bit, damaged files): PIL reads those.
    """
    try:
        with open(path, "rb") as handle:  # the header first: other files are not read twice
            header = handle.read(33)
            # IHDR follows the signature: width, height, then bit depth and colour type (2 is RGB)
            if (len(header) < 33 or header[:8] != PNG_SIGNATURE or header[12:16] != b"IHDR"
                    or header[24:26] != b"\x08\x02"):
                return None
            width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
            if width * height > FAST_PNG_MAX_PIXELS:
                return None
            data = np.frombuffer(header + handle.read(), dtype=np.uint8)
    except OSError:
        return None
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        return None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def image_size(path):
    """(width, height) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot be read as an image ({error}); replace or remove the file.") from None


def read_rgb(path):
    """H x W x 3 uint8. Grayscale, palette, RGBA and 16-bit images are converted, not rejected."""
    fast = _read_rgb_png_fast(path)
    if fast is not None:
        return fast
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Scaled by the bit depth, never by the image's own maximum: brightness must not depend on content.
        array = np.asarray(image, dtype=np.float64)
        full_scale = 65535.0 if image.mode != "I" or array.max() <= 65535 else float(2 ** 32 - 1)
        image = Image.fromarray(np.clip(np.rint(array * (255.0 / full_scale)), 0, 255).astype(np.uint8))
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


def _png_chunk(kind, data):
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def palette_png_bytes(mask, palette):
    """An 8-bit palette PNG of class indices, encoded here rather than by PIL: zlib holds no GIL while
    compressing, so many masks are written in parallel. Unused palette entries are black."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"a mask must be a non-empty 2-D array, got shape {mask.shape}")
    height, width = mask.shape
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[:len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    colours[IGNORE_INDEX] = 0
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), mask], axis=1)  # filter type 0 per row
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 3, 0, 0, 0])
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"PLTE", colours.tobytes())
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + _png_chunk(b"IEND", b""))


def write_palette_png(path, mask, palette):
    data = palette_png_bytes(mask, palette)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_rgb(path, array):
    """An RGB array as JPEG (by suffix) or PNG. PNGs are encoded by OpenCV: several times faster than PIL,
    and it releases the GIL, so writer threads run in parallel."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with atomic_path(path) as tmp:
        if Path(path).suffix.lower() in (".jpg", ".jpeg"):
            Image.fromarray(array).save(tmp, format="JPEG")
            return
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"PNG encoding failed for {path}")
        Path(tmp).write_bytes(encoded.tobytes())


def colorize(mask, palette):
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[np.asarray(mask, dtype=np.uint8)]


def overlay(image, mask, palette, background=0, alpha=0.45):
    """Blend class colours over the image; the background class (None: there is none) and ignore stay as
    the image."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    mask = np.asarray(mask)
    blend = cv2.addWeighted(image, 1 - alpha, colorize(mask, palette), alpha, 0.0)
    keep = mask == IGNORE_INDEX
    if background is not None:
        keep |= mask == background
    return np.where(keep[..., None], image, blend)
