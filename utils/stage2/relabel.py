"""Self-training: a trained segmenter relabels the images it learnt from, and the next round learns from its
masks.

Each training image is predicted whole, with the same sliding window as the test images. Where the image-level
labels are known (the training tiles' names), a class that no tile covering a pixel has in its label cannot
win that pixel (stage2.relabel_with_labels); a pixel whose winning probability is below
stage2.relabel_confidence is left unlabelled, so the loss skips it. The masks are written with a manifest that
names the model that made them, as stage 1's pseudo-masks name their checkpoint.
"""
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.data.datasets import train_items
from utils.data.imageio import IGNORE_INDEX, read_mask, read_rgb, write_palette_png
from utils.evaluation.postprocess import class_indices, fill_holes
from utils.files import BackgroundWriter
from utils.stage1.mask_writing import pseudo_mask_confusion
from utils.stage1.pseudo_masks import file_sha256, pseudo_mask_name, read_manifest, write_manifest
from utils.stage1.stitch import VoteStitcher
from utils.stage2.predict import predict_logits


def round_folder(stage2_dir, round_number):
    """Where round `round_number`'s training masks are written: the run's own `stage2/masks_round<k>`, so that no
    other run's masks are ever replaced."""
    return Path(stage2_dir) / f"masks_round{round_number}"


def relabel_settings(cfg):
    return {"confidence": cfg.stage2.relabel_confidence, "with_labels": cfg.stage2.relabel_with_labels,
            "fill_holes": list(cfg.stage1.pseudo_mask_fill_holes), "window": cfg.stage2.window,
            "overlap": cfg.stage2.overlap}


class TrainingTruth:
    """What is known of each training image stage 2 learns from: the classes its tiles' labels allow at each
    pixel, and its true mask where the data set has one (for scoring only)."""

    def __init__(self, cfg, images, whole_images):
        self.num_classes, self.encoding = len(cfg.data.classes), cfg.data.mask_encoding
        items = train_items(cfg.data.root, self.num_classes)
        self.stitcher = VoteStitcher(items, self.num_classes) if whole_images else None
        self.items = {str(item.image): item for item in items}
        self.whole_images = whole_images

    def allowed(self, image_path, shape):
        """C x H x W bool: the classes the labels of the tiles covering each pixel allow (every class where none
        does)."""
        if not self.whole_images:
            label = self.items[str(image_path)].label.astype(bool)
            return np.broadcast_to(label[:, None, None], (self.num_classes, *shape))
        return self.stitcher.allowed(Path(image_path).stem)

    def truth(self, image_path):
        if self.whole_images:
            return self.stitcher.ground_truth(Path(image_path).stem, self.encoding, self.num_classes)
        item = self.items[str(image_path)]
        return None if item.mask is None else read_mask(item.mask, self.encoding, self.num_classes)


@torch.no_grad()
def relabel_mask(model, image, allowed, cfg, runtime):
    """One training image's new mask: the model's prediction, kept to the allowed classes, unsure pixels
    unlabelled, holes filled as stage 1 fills its pseudo-masks'."""
    s2, classes = cfg.stage2, cfg.data.classes
    logits = predict_logits(model, image, runtime, s2.window, s2.overlap, s2.eval_batch_size, cfg.data.mean,
                            cfg.data.std, len(classes))
    probs = logits[0].softmax(dim=0).cpu().numpy()
    if allowed is not None:
        probs = probs * allowed
        total = probs.sum(axis=0)
        probs = probs / np.maximum(total, 1e-12)[None]
    mask = probs.argmax(axis=0).astype(np.uint8)
    mask = fill_holes(mask, class_indices(classes, cfg.stage1.pseudo_mask_fill_holes))
    unsure = probs.max(axis=0) < s2.relabel_confidence
    if allowed is not None:
        unsure |= total <= 0  # no class the labels allow
    mask[unsure & (mask == probs.argmax(axis=0))] = IGNORE_INDEX  # a filled hole stays labelled
    return mask


def relabel_training_images(cfg, model, images, whole_images, folder, model_path, runtime):
    """Masks for `images` (this rank's share) into `folder`; returns (mask paths in the order of `images`, the
    confusion matrix against the true masks, summed over ranks, or None where there are none). Kept from a run
    before when the manifest names the same model and settings."""
    folder, sha, settings = Path(folder), file_sha256(model_path), relabel_settings(cfg)
    names = [pseudo_mask_name(path) for path in images]
    masks = [folder / name for name in names]
    num_classes = len(cfg.data.classes)
    truth = TrainingTruth(cfg, images, whole_images)
    previous = read_manifest(folder)
    reuse = (previous is not None and previous.get("complete") and previous.get("checkpoint_sha256") == sha
             and previous.get("settings") == settings and all(path.is_file() for path in masks))
    runtime.barrier()
    if runtime.is_main and not reuse:
        folder.mkdir(parents=True, exist_ok=True)
        write_manifest(folder, sha, cfg.name, cfg.data.classes, [], complete=False, settings=settings)
    runtime.barrier()
    confusion, scored = np.zeros((num_classes, num_classes), np.int64), False
    model.eval()
    with BackgroundWriter() as writer:
        for path, target in tqdm(runtime.shard(list(zip(images, masks))), desc="relabelling", leave=False,
                                 disable=not runtime.is_main):
            if reuse:
                mask = read_mask(target, "index", num_classes)
            else:
                image = read_rgb(path)
                allowed = truth.allowed(path, image.shape[:2]) if cfg.stage2.relabel_with_labels else None
                mask = relabel_mask(model, image, allowed, cfg, runtime)
                writer.submit(write_palette_png, target, mask, cfg.data.palette)
            true_mask = truth.truth(path)
            if true_mask is not None and true_mask.shape == mask.shape:
                confusion += pseudo_mask_confusion(mask, true_mask, num_classes)
                scored = True
    confusion = runtime.all_reduce_sum(torch.from_numpy(np.concatenate([confusion.ravel(), [int(scored)]])).to(
        runtime.device)).cpu().numpy()
    runtime.barrier()
    if runtime.is_main and not reuse:
        write_manifest(folder, sha, cfg.name, cfg.data.classes, names, complete=True, settings=settings)
    runtime.barrier()
    return masks, (confusion[:-1].reshape(num_classes, num_classes) if confusion[-1] else None)
