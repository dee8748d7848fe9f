"""Pseudo-mask files: their names, and a manifest that records which stage-1 checkpoint made them."""
import hashlib
import json
from pathlib import Path

from utils.data.imageio import DataError
from utils.files import write_json

MANIFEST = "manifest.json"


def file_sha256(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_averaged_checkpoints(paths):
    """stage1.average_cams_with must name files that exist."""
    missing = [str(path) for path in paths if not Path(path).is_file()]
    if missing:
        raise DataError(f"stage1.average_cams_with: {missing[0]} is not a file; name stage-1 checkpoints "
                        "(runs/<name>/stage1/checkpoint.pth) that exist, or set it to [].")


def masks_checkpoint_sha(checkpoint_path, averaged_with=()):
    """The digest that ties pseudo-masks to what made them: the stage-1 checkpoint's, or, when its class maps
    were averaged with other checkpoints' (stage1.average_cams_with), a digest of all of theirs in order."""
    check_averaged_checkpoints(averaged_with)
    own = file_sha256(checkpoint_path)
    if not averaged_with:
        return own
    return hashlib.sha256(" ".join([own] + [file_sha256(path) for path in averaged_with]).encode()).hexdigest()


def pseudo_mask_name(image_path):
    """A pseudo-mask has its image's file name (labels included), always as .png."""
    return Path(image_path).with_suffix(".png").name


def read_manifest(folder):
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


# Stage-1 settings that change a pseudo-mask made from a given checkpoint: masks are reused only when
# both the checkpoint and these match.
MASK_SETTINGS = ("image_size", "cam_weights", "cam_scales", "cam_flip", "cam_refine_iterations",
                 "cam_refine_dilations", "cam_refine_colour_scale", "background_cam_scale", "pseudo_mask_fill_holes",
                 "pseudo_mask_ignore_margin", "affinity", "affinity_radius", "affinity_beta", "affinity_iterations",
                 "affinity_epochs", "affinity_lr", "affinity_margin", "crf_iterations")


def mask_settings(stage1):
    """The stage-1 settings a pseudo-mask depends on besides the checkpoint, as recorded in the manifest."""
    return {key: stage1[key] for key in MASK_SETTINGS}


def write_manifest(folder, checkpoint_sha, config_name, classes, files, complete, settings=None):
    write_json(Path(folder) / MANIFEST, {"checkpoint_sha256": checkpoint_sha, "config": config_name,
                                         "classes": list(classes), "files": sorted(files),
                                         "complete": complete, "settings": settings})


def check_pseudo_masks(folder, image_paths, checkpoint_sha=None, accept_foreign=False, checkpoint_path=None):
    """Stage 2's guard: every training image has a pseudo-mask, made by the expected stage-1 checkpoint (whose
    digest is `checkpoint_sha`; None when the run has none, at `checkpoint_path`)."""
    folder = Path(folder)
    hint = "run `python 1_train_stage1.py --config <your config>` first"
    if not folder.is_dir():
        raise DataError(f"no pseudo-masks at {folder}; {hint}.")
    missing = [p.name for p in image_paths if not (folder / pseudo_mask_name(p)).is_file()]
    manifest = read_manifest(folder)
    if accept_foreign:
        if missing:
            raise DataError(f"{folder}: {len(missing)} training images have no pseudo-mask (e.g. {missing[0]}); {hint}.")
        return manifest
    if manifest is None or not manifest.get("complete"):
        raise DataError(f"{folder}: the pseudo-mask set is partial or has no manifest; {hint}, or set "
                        "stage2.accept_foreign_pseudo_masks=true to use them anyway.")
    if missing:
        raise DataError(f"{folder}: {len(missing)} training images have no pseudo-mask (e.g. {missing[0]}); {hint}.")
    if checkpoint_sha is None:
        raise DataError(f"{folder}: these pseudo-masks were made by stage-1 run '{manifest.get('config')}', and this "
                        f"run has no stage-1 checkpoint ({checkpoint_path or 'none'}) that could vouch for them "
                        f"(check name and runs_dir); {hint}, or set stage2.accept_foreign_pseudo_masks=true to use "
                        "them anyway.")
    if manifest.get("checkpoint_sha256") != checkpoint_sha:
        raise DataError(f"{folder}: these pseudo-masks were made by another stage-1 checkpoint; rerun stage 1's "
                        "pseudo-mask step, or set stage2.accept_foreign_pseudo_masks=true to use them anyway.")
    return manifest
