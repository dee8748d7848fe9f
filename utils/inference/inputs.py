"""What inference reads: the images and slides under --input, one job per input, and images decoded for the
network at the resolution it analyses."""
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.data.imageio import IMAGE_SUFFIXES, DataError, check_name_encoding, read_rgb
from utils.slides.slide import MPP_TOLERANCE, SLIDE_ONLY_SUFFIXES, is_slide

# Decoding and encoding release the GIL, so reader and writer threads scale with the cores.
IO_THREADS = min(6, max(4, (os.cpu_count() or 4) // 2))


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
        return [(check_name_encoding(input_path), Path(input_path.name))]
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
        found.append((check_name_encoding(path), path.relative_to(input_path)))
    if not found:
        raise DataError(f"--input {input_path} holds no images or slides ({', '.join(sorted(suffixes))})"
                        f"{'' if recursive else '; add --recursive to search subfolders'}.")
    return found


def plan_jobs(found, output_dir):
    """One job per input, its outputs named by its stem (in the input's subfolder, for --recursive)."""
    return [Job(index, path, relative.as_posix(), Path(output_dir) / relative.parent / relative.stem, is_slide(path))
            for index, (path, relative) in enumerate(found)]


def check_outputs_apart(jobs, paths_of):
    """Refuse inputs whose outputs would land on one file (a.png and a.jpg both make a_mask.png), or on an input,
    before any work: otherwise one input's outputs silently replace another's. `paths_of(job)`: its output
    paths. Names are compared without regard to case, which macOS and Windows ignore."""
    owner = {}  # output path -> the job that writes it
    inputs = {str(job.path.resolve()).casefold(): job for job in jobs}
    for job in jobs:
        for path in paths_of(job).values():
            key = str(path.resolve()).casefold()
            if key in owner:
                other = owner[key]
                who = f"{other.name!r} and {job.name!r} would both" if other is not job else f"{job.name!r} would twice"
                raise DataError(f"--input: {who} write {path.name!r}; rename the inputs (or the model's classes), or "
                                "segment them into separate --output folders.")
            owner[key] = job
            if key in inputs:
                raise DataError(f"--input: the outputs of {job.name!r} would replace the input {inputs[key].name!r}; "
                                "choose an --output folder apart from the inputs.")


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
