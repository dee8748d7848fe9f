"""summary.csv, one row per input, and metrics.json over every scored input."""
import csv
import io
import json

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


def read_summary(path):
    """(columns, rows) of an earlier summary.csv, or ([], []) when there is none or it cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            return list(reader.fieldnames or []), list(reader)
    except (OSError, csv.Error, UnicodeDecodeError):
        return [], []


def earlier_confusions(output_dir, classes):
    """{file: {kind: confusion}} kept in an earlier metrics.json of the same classes ({} otherwise)."""
    try:
        earlier = json.loads((output_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    if earlier.get("classes") != list(classes):
        return {}
    return {name: {kind: np.asarray(m, np.int64) for kind, m in image.items()}
            for name, image in (earlier.get("per_image_confusion") or {}).items()}


def merge_with_earlier_run(output_dir, columns, rows, scorer, checkpoint, classes):
    """The summary of a folder that may hold an earlier run's outputs: this run's rows, each naming the checkpoint
    that made it, and the earlier rows of every input this run did not redo (an input it skipped keeps its
    earlier row, scores included, marked skipped). The scorer then holds the confusion matrices of every scored row, earlier
    ones taken from the earlier metrics.json. Returns (columns, rows, {file: confusion matrices of scored rows})."""
    for row in rows:
        if row["status"] != "skipped":
            row["checkpoint"] = checkpoint
    earlier_columns, earlier_rows = read_summary(output_dir / SUMMARY)
    earlier = {row["file"]: row for row in earlier_rows}
    kept_confusions = earlier_confusions(output_dir, classes)
    mine = {row["file"] for row in rows}
    merged = [{**earlier[row["file"]], "status": "skipped"} if row["status"] == "skipped" and row["file"] in earlier
              else row for row in rows]
    merged = [row for row in earlier_rows if row["file"] not in mine] + merged
    columns = list(dict.fromkeys(columns[:-1] + [c for c in earlier_columns if c != "status"] + ["checkpoint", "status"]))
    for row in merged:
        for column in columns:
            row.setdefault(column, "")
    redone = {row["file"] for row in rows if row["status"] != "skipped"}
    still_scored = {row["file"] for row in merged if row.get("miou")} - redone
    confusions = {name: image for name, image in kept_confusions.items() if name in still_scored}
    if scorer is not None:
        confusions.update(scorer.per_image)
    return columns, merged, confusions


def write_score(output_dir, classes, confusions, steps, checkpoint, masks=None, encoding=None):
    """metrics.json over every scored input of the folder (`confusions`: {file: {kind: matrix}}), printed as well;
    an earlier metrics.json whose images were all redone without scoring is removed, so it never describes
    outputs that changed."""
    from utils.evaluation.scoring import FolderScore
    path = output_dir / "metrics.json"
    if not confusions:
        path.unlink(missing_ok=True)
        return
    if masks is None:  # a run that scored nothing: the figures are the earlier runs', against their masks
        earlier = json.loads(path.read_text())
        masks, encoding = earlier.get("masks"), earlier.get("mask_encoding")
    scorer = FolderScore(classes, encoding, postprocessed=any("postprocessed" in c for c in confusions.values()))
    scorer.per_image = confusions
    metrics = scorer.metrics(steps)
    metrics.update(images=sorted(confusions), checkpoint=checkpoint, masks=None if masks is None else str(masks),
                   mask_encoding=encoding, classes=list(classes),
                   per_image_confusion={name: {kind: m.tolist() for kind, m in image.items()}
                                        for name, image in sorted(confusions.items())})
    write_json(path, metrics)
    line = (f"{len(confusions)} scored image(s) in {output_dir}: mIoU {metrics['input']['miou']:.4f}, "
            f"Dice {metrics['input']['mdice']:.4f}")
    if "postprocessed" in metrics:
        cleaned = metrics["postprocessed"]["input"]
        line += f"; with {steps}: mIoU {cleaned['miou']:.4f}, Dice {cleaned['mdice']:.4f}"
    print(f"{line} ({path})")
