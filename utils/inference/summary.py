"""summary.csv, one row per input, and metrics.json over every scored input."""
import csv
import io
import sys

import numpy as np
from PIL import Image

from utils.files import write_json, write_text
from utils.slides.slide import Slide

SUMMARY = "summary.csv"
COLUMNS = ["file", "kind", "width", "height", "mask_downsample", "analysis_mpp", "seconds", "tiles_predicted",
           "tiles_total"]


def class_fractions(mask, num_classes):
    mask = np.asarray(mask)
    counts = np.array([np.count_nonzero(mask == index) for index in range(num_classes)])  # 10x bincount's speed
    return counts / max(1, counts.sum())


def summary_row(classes, job, kind, status, width="", height="", seconds="", fractions=None, downsample="",
                tiles=("", ""), analysis_mpp=None):
    row = {"file": job.name, "kind": kind, "width": width, "height": height, "mask_downsample": downsample,
           "analysis_mpp": "" if analysis_mpp is None else f"{analysis_mpp:.4g}",
           "seconds": seconds if seconds == "" else f"{seconds:.2f}",
           "tiles_predicted": tiles[0], "tiles_total": tiles[1]}
    for index, name in enumerate(classes):
        row[f"frac_{name}"] = "" if fractions is None else f"{fractions[index]:.4f}"
    row["status"] = status
    return row


def summary_columns(classes, scorer=None):
    return COLUMNS + [f"frac_{name}" for name in classes] + (scorer.columns() if scorer else []) + ["status"]


def error_row(classes, job, kind, error):
    message = " ".join(str(error).split()) or type(error).__name__
    return summary_row(classes, job, kind, f"error: {message}")


def skipped_row(segmenter, job):
    """A row for an input whose outputs exist: fractions from the saved mask, sizes from the input."""
    paths = segmenter.paths(job)
    fractions, width, height, kind = None, "", "", "slide" if job.slide else "image"
    try:
        mask = np.asarray(Image.open(paths["mask"]))
        fractions = class_fractions(mask, len(segmenter.classes))
        if job.slide:
            with Slide(job.path) as slide:
                width, height = slide.dimensions
        else:  # a plain image's mask has the image's size
            height, width = mask.shape
            network_side = max(round(width * segmenter.zoom), round(height * segmenter.zoom))
            kind = "tile" if network_side <= segmenter.window else "image"
    except Exception:  # the row is informative only; the outputs already exist
        pass
    return summary_row(segmenter.classes, job, kind, "skipped", width, height, fractions=fractions)


def write_summary(path, columns, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


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
