"""What stage 2 learns from and is checked on: the training images with their pseudo-masks (or true masks),
the validation images, and the checks that a crop size and batch suit them."""
from pathlib import Path

import numpy as np

from utils.config import ConfigError, pseudo_mask_dir, run_dir
from utils.data.datasets import median_image_size, split_items, train_items
from utils.data.imageio import DataError, list_images
from utils.stage1.pseudo_masks import check_pseudo_masks, masks_checkpoint_sha, pseudo_mask_name
from utils.stage1.stitch import whole_image_dir, write_whole_ground_truth


def training_pairs(cfg):
    """(images, masks, mask encoding): pseudo-masks by default; ground truth for few-shot adaptation, or as the
    fully supervised ceiling the pseudo-masks are measured against."""
    s2, num_classes = cfg.stage2, len(cfg.data.classes)
    items = train_items(cfg.data.root, num_classes)
    if s2.train_masks == "ground_truth":
        if s2.train_on == "whole_images":
            folder = Path(cfg.data.root) / "train" / "whole_ground_truth"
            pairs = write_whole_ground_truth(items, folder, cfg.data.mask_encoding, num_classes, cfg.data.palette)
            encoding, missing = "index", (f"{cfg.data.root}/train/mask lacks masks for some patches of every "
                                          "training image; stage2.train_masks=ground_truth with "
                                          "stage2.train_on=whole_images needs them all.")
        else:
            pairs = [(item.image, item.mask) for item in items if item.mask is not None]
            encoding, missing = cfg.data.mask_encoding, (f"{cfg.data.root}/train/mask holds no masks for the "
                                                         "training images; stage2.train_masks=ground_truth needs them.")
        if not pairs:
            raise DataError(missing)
        if s2.max_train_images is not None:
            order = np.random.default_rng(cfg.seed).permutation(len(pairs))[:s2.max_train_images]
            pairs = [pairs[i] for i in sorted(order)]
        return [image for image, _ in pairs], [mask for _, mask in pairs], encoding
    folder = pseudo_mask_dir(cfg)
    stage1_checkpoint = run_dir(cfg, "stage1") / "checkpoint.pth"
    expected_sha = (masks_checkpoint_sha(stage1_checkpoint, cfg.stage1.average_cams_with)
                    if stage1_checkpoint.is_file() and not s2.accept_foreign_pseudo_masks else None)
    if s2.train_on == "whole_images":
        whole = whole_image_dir(folder)
        if not (whole / "img").is_dir():
            raise DataError(f"no whole training images in {whole}; stage2.train_on: whole_images needs stage 1 "
                            "run with stage1.stitch_whole_images: true.")
        images = list_images(whole / "img")
        check_pseudo_masks(whole / "mask", images, expected_sha, s2.accept_foreign_pseudo_masks, stage1_checkpoint)
        images = images[:s2.max_train_images] if s2.max_train_images is not None else images
        return images, [whole / "mask" / pseudo_mask_name(path) for path in images], "index"
    check_pseudo_masks(folder, [i.image for i in items], expected_sha, s2.accept_foreign_pseudo_masks,
                       stage1_checkpoint)
    if s2.max_train_images is not None:
        items = items[:s2.max_train_images]
    return [i.image for i in items], [folder / pseudo_mask_name(i.image) for i in items], "index"


def check_crop_size(crop_size, images, train_on="patches"):
    """A crop larger than the training images would be mostly padding, which the uncertainty and smoothness
    terms and BatchNorm would all learn from; stage 2 trains on the images at their own size."""
    width, height = median_image_size(images)
    if crop_size > min(width, height):
        source = ("the prepare.patch_size they were cut at" if train_on == "patches"
                  else "the whole training images stitched by stage 1")
        raise ConfigError(f"stage2.crop_size={crop_size} is larger than the training images ({width}x{height} px "
                          f"for most of them, {source}); set stage2.crop_size to at most {min(width, height)}.")


def check_batch_statistics(crops, per_rank_batch, world_size):
    """DPR's pooled branch normalises 1 x 1 maps in training, so every process's batch needs two crops or more."""
    smallest = per_rank_batch if crops // world_size >= per_rank_batch else -(-crops // world_size)
    if smallest < 2:
        raise ConfigError(f"stage 2 would train on batches of {smallest} crop per process ({crops} crops per epoch, "
                          f"stage2.batch_size {per_rank_batch * world_size} over {world_size} process(es)), and its "
                          "BatchNorm needs two; raise stage2.batch_size, stage2.crops_per_image or "
                          "stage2.max_train_images.")


def validation_items(cfg):
    """The val images; optional only when stage 2 keeps its last epoch rather than choosing one on them."""
    folder = Path(cfg.data.root) / "val" / "img"
    if cfg.stage2.keep_epoch == "best_val" and not folder.is_dir():
        raise DataError(f"{folder} does not exist: stage 2 chooses its epoch on validation images; hold some "
                        "out (prepare.val_count) or set stage2.keep_epoch: last to keep the last epoch.")
    return split_items(cfg.data.root, "val", required=False)
