"""Stage 1: train the classifier with Implicit Boundary Mining on image-level labels, then turn its
multi-layer class activation maps into pseudo-masks on disk.

    python 1_train_stage1.py --config configs/glas.yaml [--set stage1.epochs=3] [--resume]

Writes runs/<name>/stage1/{config.yaml, checkpoint.pth, log.csv, metrics.json, run.json, samples.png} and
one pseudo-mask per training image into data.pseudo_mask_dir.
"""
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.classifier import Stage1Classifier, build_backbone
from utils.checkpoint import STAGE1_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from utils.cli import run_main
from utils.config import ConfigError, background_index, base_parser, load_config, pseudo_mask_dir, run_dir
from utils.cuda_graphs import TrainStep
from utils.data.datasets import (ClassificationSet, check_split_masks, load_pair, split_items, test_splits, train_items,
                                 training_loader, training_tile_size)
from utils.data.imageio import IGNORE_INDEX, read_mask, read_rgb, write_palette_png, write_rgb
from utils.data.transforms import to_tensor
from utils.evaluation.metrics import confusion_matrix, scores
from utils.evaluation.postprocess import class_indices, describe, fill_holes
from utils.files import BackgroundWriter, write_json
from utils.provenance import RUN_RECORD, StepTimer
from utils.run_folder import begin_record, check_checkpoint_fits, stage1_checkpoint_to_use
from utils.runtime import cleanup, compile_model, loader_options, setup_runtime, start_run, unwrap
from utils.stage1.cam import (cams_to_masks, heatmap_of, multi_layer_cam, normalise_cams, refine_cams,
                              scaled_size)
from utils.stage1.pseudo_masks import file_sha256, mask_settings, pseudo_mask_name, read_manifest, write_manifest
from utils.stage1.stitch import (VoteStitcher, mean_tile_votes, patch_votes, tile_boxes, vote_mask, weigh_background,
                                 whole_image_dir)
from utils.timm_settings import check_vit_settings, inspect_network, resolve_normalisation
from utils.training import (CsvLog, TrainingError, check_finite, freeze_batchnorm, layer_decay_scales,
                            out_of_memory_message, restore_scaler, rng_state, set_poly_lr, set_rng_state,
                            sgd_with_multipliers)
from utils.visualize import contact_sheet, heat_overlay, mask_picture
from utils.weight_packages import check_weight_source, is_package_source


def build_classifier(cfg):
    s1 = cfg.stage1
    if s1.backbone == "resnet38" and (s1.pretrained is True or is_package_source(s1.pretrained)):
        raise ConfigError("stage1.pretrained: ResNet-38 weights are on no model hub; set it to the path of "
                          "ilsvrc-cls_rna-a1_cls1000_ep-0001.pth (see init_weights/README.md).")
    try:
        check_weight_source(s1.pretrained, "stage1.pretrained")
    except ValueError as error:
        raise ConfigError(f"stage1.pretrained: {error}") from None
    facts = inspect_network(cfg, "stage1")
    check_vit_settings(cfg, "stage1", facts)
    try:
        backbone = build_backbone(s1.backbone, s1.pretrained, s1.out_indices, s1.output_stride, facts.kwargs,
                                  s1.vit_blocks)
    except ValueError as error:
        raise CheckpointError(f"stage1.pretrained: {error}") from None
    model = Stage1Classifier(backbone, len(cfg.data.classes), use_ibm=s1.ibm)
    if s1.frozen_stages:
        if not hasattr(backbone, "freeze_stages"):
            raise ConfigError(f"stage1.frozen_stages applies to convolutional timm backbones, not {s1.backbone}; "
                              "set it to 0 (stage1.freeze_encoder freezes a whole backbone).")
        try:
            backbone.freeze_stages(s1.frozen_stages)
        except ValueError as error:
            raise ConfigError(f"stage1.frozen_stages: {error}") from None
    if s1.freeze_encoder:
        model.freeze_backbone()
    if s1.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    return model


def classification_loss(outputs, labels, s1):
    """Multi-label soft margin on each head (weighted) + IBM's boundary and embedding regularisers."""
    loss = sum(w * F.multilabel_soft_margin_loss(logits.float(), labels)
               for w, logits in zip(s1.head_weights, outputs["logits"]))
    if outputs["boundary"] is not None:
        loss = loss + s1.boundary_weight * outputs["boundary"].float().pow(2).mean()
        loss = loss + s1.embedding_weight * outputs["embedding"].float().norm(dim=1).mean()
    return loss


def classifier_train_step(trainer, model, s1, runtime, scaler=None):
    """Forward, loss and backward of a batch of (images, labels); returns the loss and the deep head's scores."""
    def forward_loss(images, labels):
        with runtime.autocast():
            outputs = trainer(images)
            loss = classification_loss(outputs, labels, s1)
        return loss, outputs["logits"][-1]

    return TrainStep(forward_loss, model.parameters(), runtime, scaler)


def set_train_mode(model, s1):
    model.train()
    if s1.freeze_bn:
        freeze_batchnorm(model)


def freeze_stem(model, s1):
    """The published recipe keeps ResNet-38's first convolution and b2 group fixed."""
    if s1.freeze_stem and s1.backbone == "resnet38":
        for name, param in model.backbone.named_parameters():
            if name.split(".")[0] in ("conv1a", "b2", "b2_1", "b2_2"):
                param.requires_grad_(False)


def train_classifier(cfg, model, items, runtime, out_dir, resume):
    s1 = cfg.stage1
    if s1.batch_size % runtime.world_size:
        raise TrainingError(f"stage1.batch_size={s1.batch_size} is not divisible by the {runtime.world_size} "
                            "processes; choose a multiple of the process count.")
    per_rank_batch = s1.batch_size // runtime.world_size
    dataset = ClassificationSet(items, s1.image_size, cfg.data.mean, cfg.data.std, augment=True, seed=cfg.seed,
                                jitter=(s1.hed_jitter, s1.color_jitter))
    loader = training_loader(dataset, per_rank_batch, runtime, cfg.seed)
    freeze_stem(model, s1)
    if s1.freeze_bn:
        freeze_batchnorm(model)
    model.to(runtime.device, memory_format=torch.channels_last)  # depthwise and dense convolutions alike run faster
    optimizer = sgd_with_multipliers([model.backbone], model.new_modules(), s1.lr, s1.momentum,
                                     s1.weight_decay, s1.lr_mult_new,
                                     layer_decay_scales(model.backbone, s1.layer_decay))
    total_steps = max(1, s1.epochs * len(loader))
    checkpoint_path = out_dir / "checkpoint.pth"
    log = CsvLog(out_dir / "log.csv", ["epoch", "loss", "accuracy", "lr", "seconds"], keep_existing=resume)
    scaler = runtime.grad_scaler()
    start_epoch, step = 0, 0
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, STAGE1_FORMAT)
        load_weights(model, state, cfg, checkpoint_path, "--resume continues it")
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            restore_scaler(scaler, state)
        start_epoch, step = state["epoch"], state["step"]
        log.truncate(start_epoch)
        if runtime.is_main:
            print(f"resuming stage 1 at epoch {start_epoch + 1} of {s1.epochs}")
    trainer = model
    if runtime.distributed:
        trainer = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if runtime.device.type == "cpu"
                                                            else [runtime.device])
    if cfg.compile:
        trainer = compile_model(trainer)
    train_step = classifier_train_step(trainer, model, s1, runtime, scaler)
    for epoch in range(start_epoch, s1.epochs):
        loader.sampler.set_epoch(epoch)
        set_train_mode(model, s1)
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, correct label decisions, labels, images
        correct = 0
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"stage 1 epoch {epoch + 1}/{s1.epochs}", disable=not runtime.is_main,
                   leave=False)
        for images, labels, _ in bar:
            images = images.to(runtime.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            labels = labels.to(runtime.device, non_blocking=True)
            set_poly_lr(optimizer, step, total_steps, s1.poly_power)
            try:
                loss, scores = train_step(images, labels)
            except torch.OutOfMemoryError:
                raise TrainingError(out_of_memory_message("stage1.batch_size")) from None
            loss_value = loss.item()  # the one host-device sync of a step; no update is made from a bad loss
            check_finite(loss_value, epoch, step, f"the last good checkpoint is {checkpoint_path}")
            correct = correct + ((scores > 0).float() == labels).sum()  # stays on the device until the epoch ends
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), s1.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            totals += torch.tensor([loss_value * len(images), 0, labels.numel(), len(images)], dtype=torch.float64)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        totals[1] = float(correct)
        totals = runtime.all_reduce_sum(totals.to(runtime.device)).cpu()
        seconds = time.perf_counter() - started
        row = {"epoch": epoch + 1, "loss": round(totals[0].item() / max(totals[3].item(), 1), 5),
               "accuracy": round(totals[1].item() / max(totals[2].item(), 1), 5),
               "lr": f"{optimizer.param_groups[0]['lr']:.3g}", "seconds": round(seconds, 1)}
        runtime.broadcast_buffers(model)  # the pseudo-masks of every rank then come from the saved weights
        if runtime.is_main:
            if epoch == start_epoch:
                begin_record(cfg, out_dir)  # the record changes with the run's first own checkpoint
            log.append(row)
            tqdm.write(f"stage 1 epoch {row['epoch']}: loss {row['loss']}, label accuracy {row['accuracy']}, "
                       f"{row['seconds']} s")
            save_checkpoint(checkpoint_path, {
                "format": STAGE1_FORMAT, "model": model.state_dict(), "config": cfg.to_dict(),
                "epoch": epoch + 1, "step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                "scaler": scaler.state_dict()})
        runtime.barrier()
    return checkpoint_path


def load_weights(model, state, cfg, path, action):
    """A stage-1 checkpoint's weights, refused with the setting that differs when they were made for another
    network."""
    check_checkpoint_fits(state.get("config"), cfg, "stage1", path, action)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path}: its weights do not fit this run's classifier "
                              f"({str(error).splitlines()[0][:160]}); {action} only with the same network.") from None


def network_input(image, size_or_scale, mean, std, multiple=1):
    """Resize an RGB array for the classifier (square size for tiles, scale factor for whole images, whose
    sides are then rounded to a multiple of a ViT's patch size)."""
    import cv2
    if isinstance(size_or_scale, int):
        size = (size_or_scale, size_or_scale)
    else:
        height, width = scaled_size(image.shape[0], image.shape[1], size_or_scale, multiple)
        size = (width, height)
    if size != (image.shape[1], image.shape[0]):
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return to_tensor(image, mean, std)


class TileSet(torch.utils.data.Dataset):
    """Training tiles for CAM inference: network input, label, original size, index."""

    def __init__(self, items, image_size, mean, std):
        self.items, self.image_size, self.mean, self.std = items, image_size, mean, std

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image = read_rgb(self.items[index].image)
        tensor = network_input(image, self.image_size, self.mean, self.std)
        return tensor, torch.from_numpy(self.items[index].label), torch.tensor(image.shape[:2]), index


def class_maps(model, images, out_size, labels, s1, runtime):
    """The class maps that decide a pseudo-mask: multi-layer CAMs (over the configured scales and flips) at
    out_size, each class scaled to [0, 1] and kept only where the label has it, then refined along colour
    edges when stage1.cam_refine_iterations asks. labels None: predicted from the image (threshold).
    Returns (maps N x C x H x W, labels N x C)."""
    with runtime.autocast():
        cams, probabilities = multi_layer_cam(model, images, out_size, s1.cam_weights, s1.cam_scales, s1.cam_flip)
    if labels is None:
        labels = (probabilities > s1.label_threshold).float()
    maps = normalise_cams(cams) * labels.to(cams.device, torch.float32)[:, :, None, None]
    maps = refine_cams(maps, images, s1.cam_refine_iterations, s1.cam_refine_dilations, s1.cam_refine_colour_scale)
    return maps, labels


def pseudo_mask_confusion(mask, truth, num_classes):
    """Training pseudo-masks as stage 2 learns from them: pixels a pseudo-mask leaves unlabelled (ignore)
    are not scored, since stage 2 does not learn from them. (Whole val/test images count every pixel.)"""
    return confusion_matrix(mask, np.where(mask == IGNORE_INDEX, IGNORE_INDEX, truth), num_classes)


@torch.no_grad()
def write_pseudo_masks(cfg, model, items, runtime, checkpoint_sha, overwrite=False):
    """Pseudo-masks for the training tiles (this rank's share), scored against train/mask when present."""
    s1, classes = cfg.stage1, cfg.data.classes
    folder = pseudo_mask_dir(cfg)
    previous = read_manifest(folder)
    stitcher = VoteStitcher(items, len(classes)) if s1.stitch_whole_images else None
    # stitching needs every patch's class maps, so nothing is kept from before
    settings = mask_settings(s1)
    reuse = (not overwrite and stitcher is None and previous is not None
             and previous.get("checkpoint_sha256") == checkpoint_sha and previous.get("settings") == settings)
    todo = [i for i, item in enumerate(items)
            if not (reuse and (folder / pseudo_mask_name(item.image)).is_file())]
    runtime.barrier()  # every rank has read the old manifest before rank 0 replaces it
    if runtime.is_main:
        if previous is not None and previous.get("checkpoint_sha256") != checkpoint_sha:  # never without a word
            print(f"{folder} holds the pseudo-masks of another stage-1 checkpoint (run '{previous.get('config')}'); "
                  "this run's replace them")
        folder.mkdir(parents=True, exist_ok=True)
        if not reuse:  # else, once the manifest names this checkpoint, a cut-short run would keep them as its own
            for index in todo:
                (folder / pseudo_mask_name(items[index].image)).unlink(missing_ok=True)
        write_manifest(folder, checkpoint_sha, cfg.name, classes, [], complete=False, settings=settings)
    runtime.barrier()
    # whole batches per rank, each as a single process would form it: masks do not depend on the rank count
    batches = [todo[start:start + s1.cam_batch_size] for start in range(0, len(todo), s1.cam_batch_size)]
    mine = [index for batch in runtime.shard(batches) for index in batch]
    dataset = torch.utils.data.Subset(TileSet(items, s1.image_size, cfg.data.mean, cfg.data.std), mine)
    loader = DataLoader(dataset, batch_size=s1.cam_batch_size, **loader_options(runtime, train=False))
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    samples = []
    model.eval()
    with BackgroundWriter() as writer:
        for images, labels, sizes, indices in tqdm(loader, desc="pseudo-masks", disable=not runtime.is_main):
            images = images.to(runtime.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            uniform = bool((sizes == sizes[0]).all())
            try:
                cams, _ = class_maps(model, images, tuple(sizes[0].tolist()) if uniform else images.shape[-2:],
                                     labels, s1, runtime)
            except torch.OutOfMemoryError:
                raise TrainingError(out_of_memory_message("stage1.cam_batch_size")) from None
            background = background_index(classes, cfg.data.background)
            masks = cams_to_masks(cams, labels, background, s1.background_cam_scale)
            heat = heatmap_of(cams, labels, background)
            fill = class_indices(classes, s1.pseudo_mask_fill_holes)
            masks, heat = masks.cpu().numpy(), heat.cpu().numpy()
            votes = patch_votes(cams, labels.to(cams.device)).cpu().numpy() if stitcher else None
            for row, index in enumerate(indices.tolist()):
                item, mask = items[index], masks[row]
                if not uniform:
                    import cv2
                    height, width = sizes[row].tolist()
                    mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
                    if stitcher:
                        votes_row = np.stack([cv2.resize(v, (width, height)) for v in votes[row]])
                if stitcher:
                    stitcher.add(item, votes_row if not uniform else votes[row])
                mask = fill_holes(mask, fill)
                writer.submit(write_palette_png, folder / pseudo_mask_name(item.image), mask, cfg.data.palette)
                if item.mask is not None:
                    truth = read_mask(item.mask, cfg.data.mask_encoding, len(classes))
                    if truth.shape == mask.shape:
                        confusion += pseudo_mask_confusion(mask, truth, len(classes))
                    else:
                        tqdm.write(f"warning: {item.mask} is not the size of its image; left out of the score.",
                                   file=sys.stderr)
                if len(samples) < s1.samples and item.label.sum() >= 2:  # mixed tiles show the CAM at work
                    samples.append((item, mask, heat[row]))
    kept = sorted(set(range(len(items))) - set(todo))
    for index in runtime.shard(kept):  # masks kept from before still count in the score
        item = items[index]
        if item.mask is not None:
            mask = read_mask(folder / pseudo_mask_name(item.image), "index", len(classes))
            truth = read_mask(item.mask, cfg.data.mask_encoding, len(classes))
            if truth.shape == mask.shape:
                confusion += pseudo_mask_confusion(mask, truth, len(classes))
    confusion = runtime.all_reduce_sum(torch.from_numpy(confusion).to(runtime.device)).cpu().numpy()
    if stitcher:
        write_whole_images(cfg, stitcher, runtime, checkpoint_sha)
    runtime.barrier()
    if runtime.is_main:
        write_manifest(folder, checkpoint_sha, cfg.name, classes,
                       [pseudo_mask_name(item.image) for item in items], complete=True, settings=settings)
    return confusion, samples, len(kept)


def write_whole_images(cfg, stitcher, runtime, checkpoint_sha):
    """The training images put back together from their patches, with pseudo-masks from the patches'
    stitched class maps (whole/img and whole/mask beside the patch pseudo-masks)."""
    stitcher.reduce(runtime)
    if not runtime.is_main:
        return
    classes = cfg.data.classes
    folder = whole_image_dir(pseudo_mask_dir(cfg))
    settings = mask_settings(cfg.stage1)
    write_manifest(folder / "mask", checkpoint_sha, cfg.name, classes, [], complete=False, settings=settings)
    background = background_index(classes, cfg.data.background)
    fill = class_indices(classes, cfg.stage1.pseudo_mask_fill_holes)
    names, unlabelled, pixels = [], 0, 0
    with BackgroundWriter() as writer:
        for stem in tqdm(stitcher.stems(), desc="whole images", leave=False):
            mask = stitcher.mask(stem, background, cfg.stage1.background_cam_scale)
            filled = fill_holes(mask, fill)
            if cfg.stage1.pseudo_mask_ignore_margin > 0:  # pixels filled as a gland's lumen stay labelled
                unsure = stitcher.uncertain(stem, cfg.stage1.pseudo_mask_ignore_margin, background,
                                            cfg.stage1.background_cam_scale)
                filled[unsure & (filled == mask)] = IGNORE_INDEX
            mask = filled
            unlabelled, pixels = unlabelled + int((mask == IGNORE_INDEX).sum()), pixels + mask.size
            writer.submit(write_rgb, folder / "img" / f"{stem}.png", stitcher.image(stem))
            writer.submit(write_palette_png, folder / "mask" / f"{stem}.png", mask, cfg.data.palette)
            names.append(f"{stem}.png")
    write_manifest(folder / "mask", checkpoint_sha, cfg.name, classes, names, complete=True, settings=settings)
    print(f"{len(names)} whole training images and their stitched pseudo-masks written to {folder}"
          f" ({100 * unlabelled / max(pixels, 1):.1f}% of their pixels left unlabelled)")


@torch.no_grad()
def whole_image_votes(cfg, model, image, tile, runtime):
    """C x H x W class votes of a whole image, made the way the training images' are: the image is cut into
    half-overlapping tiles of the training tile size (`tile` = (h, w) px), each seen at stage1.image_size
    with the labels the classifier predicts for that tile, and the tiles' votes are averaged where they
    overlap. The classifier thus sees what it was trained on, whatever the image's size."""
    s1 = cfg.stage1
    height, width = image.shape[:2]
    boxes = tile_boxes(height, width, tile)
    scale = s1.image_size / max(tile)
    multiple = getattr(model, "size_multiple", 1)
    votes = []
    for start in range(0, len(boxes), s1.cam_batch_size):
        batch = boxes[start:start + s1.cam_batch_size]
        tensor = torch.stack([network_input(image[y:y + h, x:x + w], scale, cfg.data.mean, cfg.data.std, multiple)
                              for y, x, h, w in batch]).to(runtime.device)
        maps, labels = class_maps(model, tensor, batch[0][2:], None, s1, runtime)
        votes.append(patch_votes(maps, labels.to(maps.device)).cpu().numpy())
    return mean_tile_votes(np.concatenate(votes), boxes, height, width)


@torch.no_grad()
def score_whole_images(cfg, model, split_list, runtime, tile):
    """CAM masks of whole val/test images from their tiles' votes (whole_image_votes), scored on every
    labelled pixel: a pixel no class claims is background, or a miss where there is no background class.

    Returns the confusion matrices (C x (C + 1)) without and with post-processing (None when none is set).
    """
    s1, classes = cfg.stage1, cfg.data.classes
    num_classes, background = len(classes), background_index(classes, cfg.data.background)
    fill = class_indices(classes, cfg.postprocess.fill_holes)
    confusion = np.zeros((2, num_classes, num_classes + 1), dtype=np.int64)
    model.eval()
    for item in tqdm(runtime.shard(split_list), desc="scoring CAMs", disable=not runtime.is_main, leave=False):
        image, truth = load_pair(item, cfg.data.mask_encoding, num_classes)
        votes = weigh_background(whole_image_votes(cfg, model, image, tile, runtime), background,
                                 s1.background_cam_scale)
        mask = vote_mask(votes, background)  # unclaimed pixels are background, or misses without one
        confusion[0] += confusion_matrix(mask, truth, num_classes, count_unclaimed=True)
        if fill:
            confusion[1] += confusion_matrix(fill_holes(mask, fill), truth, num_classes, count_unclaimed=True)
    confusion = runtime.all_reduce_sum(torch.from_numpy(confusion).to(runtime.device)).cpu().numpy()
    return confusion[0], (confusion[1] if fill else None)


def save_samples(path, samples, cfg):
    rows = []
    for item, mask, heat in samples:
        image = read_rgb(item.image)
        truth = (mask_picture(read_mask(item.mask, cfg.data.mask_encoding, len(cfg.data.classes)),
                              cfg.data.palette) if item.mask is not None else None)
        rows.append([image, heat_overlay(image, heat), mask_picture(mask, cfg.data.palette), truth])
    if rows:
        contact_sheet(path, rows, ["image", "CAM", "pseudo-mask", "ground truth"])


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="continue training from checkpoint.pth")
    parser.add_argument("--masks-only", action="store_true",
                        help="skip training; write pseudo-masks from the existing checkpoint.pth")
    parser.add_argument("--overwrite", action="store_true", help="rewrite pseudo-masks that already exist")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    train = stage1_checkpoint_to_use(cfg, args.masks_only) is None
    checkpoint_path = run_dir(cfg, "stage1") / "checkpoint.pth"
    normalisation = resolve_normalisation(cfg, "stage1")
    timer = StepTimer("stage1")
    runtime = setup_runtime(cfg)
    out_dir = start_run(cfg, runtime, "stage1")
    num_classes = len(cfg.data.classes)
    items = train_items(cfg.data.root, num_classes)
    held_out = {"val": split_items(cfg.data.root, "val", required=False)}
    tests, missing = test_splits(cfg.data.root, cfg.data.test_splits)
    held_out.update(tests)
    for split, split_list in held_out.items():
        check_split_masks(split_list, cfg.data.mask_encoding, num_classes, split)
    if runtime.is_main:
        present = np.stack([item.label for item in items]).sum(0).astype(int).tolist()
        print(f"stage 1 on {len(items)} training images ({', '.join(f'{c}: {n}' for c, n in zip(cfg.data.classes, present))}); "
              f"device {runtime.device}, {runtime.world_size} process(es)")
        if normalisation:
            print(normalisation)
        for split in missing:
            print(f"test split '{split}' is not in {cfg.data.root} (no {split}/img folder); skipped.")

    model = build_classifier(cfg)
    if train:
        train_classifier(cfg, model, items, runtime, out_dir, args.resume)
    else:
        state = load_checkpoint(checkpoint_path, STAGE1_FORMAT)
        load_weights(model, state, cfg, checkpoint_path, "a checkpoint is used as it is")
        cfg.stage1.epochs = state["epoch"]  # the record then describes the checkpoint beside it
        if runtime.is_main:
            print(f"no training: {checkpoint_path} (epoch {state['epoch']}) is used as it is")
    model = unwrap(model).to(runtime.device).to(memory_format=torch.channels_last)
    checkpoint_sha = file_sha256(checkpoint_path)

    confusion, samples, skipped = write_pseudo_masks(cfg, model, items, runtime, checkpoint_sha, args.overwrite)
    metrics, postprocessed = {}, {}
    if any(item.mask is not None for item in items):
        metrics["train"] = scores(confusion)
    tile = training_tile_size([item.image for item in items])
    if runtime.is_main and any(held_out.values()):
        print(f"whole images are scored over {tile[1]}x{tile[0]} px tiles (the training tiles' size), half "
              "overlapping, each seen as the classifier was trained")
    for split, split_list in held_out.items():
        if split_list:
            raw, cleaned = score_whole_images(cfg, model, split_list, runtime, tile)
            metrics[split] = scores(raw)
            if cleaned is not None:
                postprocessed[split] = scores(cleaned)
    steps = describe(cfg.data.classes, class_indices(cfg.data.classes, cfg.postprocess.fill_holes))
    if postprocessed:
        metrics["postprocessed"] = {"steps": steps, **postprocessed}
    metrics["images"] = {split: [item.stem for item in split_list] for split, split_list in held_out.items()
                         if split_list}
    if runtime.is_main:
        begin_record(cfg, out_dir)  # again: these metrics may use other settings than the checkpoint's run
        write_json(out_dir / "metrics.json", metrics)
        save_samples(out_dir / "samples.png", samples, cfg)
        for split in [s for s in metrics if s in held_out or s == "train"]:
            line = f"pseudo-masks on {split}: mIoU {metrics[split]['miou']:.4f}, Dice {metrics[split]['mdice']:.4f}"
            if split in postprocessed:
                line += (f"; with {steps}: mIoU {postprocessed[split]['miou']:.4f}, "
                         f"Dice {postprocessed[split]['mdice']:.4f}")
            print(line)
        print(f"pseudo-masks written to {pseudo_mask_dir(cfg)}" + (f" ({skipped} kept from before)" if skipped else ""))
        write_json(out_dir / RUN_RECORD, timer.record(runtime.device, runtime.world_size,
                                                       resumed=bool(args.resume), masks_only=bool(args.masks_only)))
        print(f"stage 1 outputs in {out_dir} ({timer.seconds / 60:.1f} min)")
    cleanup(runtime)
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
