"""Stage 2: train the Dual Path Refinement segmenter with the IICB loss on stage 1's pseudo-masks, keep
the best epoch by validation mIoU, and score it on the test set.

    python 2_train_stage2.py --config configs/glas.yaml [--set stage2.epochs=3] [--resume]

Writes runs/<name>/stage2/{config.yaml, best.pth, best.safetensors, last.pth, log.csv, metrics.json, run.json,
predictions/<split>/, overlays/<split>/, test_samples.png}. Every figure is computed without post-processing,
and again with the YAML's `postprocess` steps when there are any; the best epoch is chosen on the
validation mIoU without post-processing. A final model trained on every image (`stage2.keep_epoch: last`)
keeps its last epoch instead and needs no validation images; best.pth is then that epoch.
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.dpr import DPR, RefinementAttention
from models.timm_encoder import load_encoder_state
from utils.checkpoint import (STAGE1_FORMAT, STAGE2_FORMAT, CheckpointError, load_checkpoint, save_checkpoint,
                              save_safetensors)
from utils.cli import run_main
from utils.config import ConfigError, background_index, base_parser, load_config, pseudo_mask_dir, run_dir
from utils.cuda_graphs import TrainStep
from utils.data.datasets import (SegmentationSet, check_split_masks, load_pair, median_image_size, split_items,
                                 test_splits, train_items, training_loader)
from utils.data.imageio import DataError, colorize, list_images, overlay, read_mask, write_palette_png, write_rgb
from utils.evaluation.metrics import confusion_matrix, scores
from utils.evaluation.postprocess import class_indices, describe, fill_holes
from utils.files import BackgroundWriter, write_json
from utils.provenance import RUN_RECORD, StepTimer
from utils.run_folder import begin_record, check_checkpoint_fits
from utils.runtime import cleanup, compile_model, setup_runtime, start_run
from utils.stage1.pseudo_masks import check_pseudo_masks, masks_checkpoint_sha, pseudo_mask_name
from utils.stage1.stitch import whole_image_dir, write_whole_ground_truth
from utils.stage2.losses import IICBLoss
from utils.stage2.predict import FlipAveraged, predict_mask, segmenter_meta
from utils.timm_settings import check_vit_settings, inspect_network, resolve_normalisation
from utils.training import (CsvLog, TrainingError, WeightAverage, check_finite, out_of_memory_message, restore_scaler,
                            rng_state, set_poly_lr, set_rng_state, sgd_with_layer_decay)
from utils.visualize import contact_sheet
from utils.weight_packages import check_weight_source


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


def build_segmenter(cfg):
    s2 = cfg.stage2
    try:
        check_weight_source(s2.pretrained, "stage2.pretrained")
    except ValueError as error:
        raise ConfigError(f"stage2.pretrained: {error}") from None
    facts = inspect_network(cfg, "stage2")
    check_vit_settings(cfg, "stage2", facts)
    try:
        model = DPR(s2.encoder, len(cfg.data.classes), pretrained=s2.pretrained, refine=s2.refinement_attention,
                    aux=s2.aux_path, encoder_kwargs=facts.kwargs, vit_block=s2.vit_block,
                    encoder_stage=s2.encoder_stage, refine_hidden=s2.refinement_hidden,
                    refine_gate_scale=s2.refinement_gate_scale)
    except ValueError as error:
        raise CheckpointError(f"stage2.pretrained: {error}") from None
    if s2.init_from:
        state = load_checkpoint(s2.init_from, STAGE2_FORMAT)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:
            raise CheckpointError(f"stage2.init_from: {s2.init_from} does not fit a {s2.encoder} DPR with "
                                  f"{len(cfg.data.classes)} classes.") from None
        print(f"starting from {s2.init_from}")
    if s2.encoder_from_stage1 and not s2.init_from:
        start_encoder_from_stage1(cfg, model)
    if s2.frozen_stages:
        if model.size_multiple > 1:
            raise ConfigError("stage2.frozen_stages applies to convolutional encoders; set it to 0 "
                              "(stage2.freeze_encoder freezes a whole Vision Transformer).")
        try:
            model.freeze_encoder_stages(s2.frozen_stages)
        except ValueError as error:
            raise ConfigError(f"stage2.frozen_stages: {error}") from None
    if s2.freeze_encoder:
        model.freeze_encoder()
    if s2.grad_checkpointing:
        model.encoder.set_grad_checkpointing(True)
    return model


def start_encoder_from_stage1(cfg, model):
    """Without pretrained weights, the stage-1 classifier's backbone is the best start the encoder has: it has
    already learnt these tissues from every training tile. The stages the encoder has are copied from it."""
    s1, s2 = cfg.stage1, cfg.stage2
    if s1.backbone != s2.encoder or weight_kwargs(s1.backbone_kwargs) != weight_kwargs(s2.encoder_kwargs):
        raise ConfigError(f"stage2.encoder_from_stage1 needs the same network in both stages; stage1.backbone is "
                          f"{s1.backbone} and stage2.encoder is {s2.encoder} (or their kwargs differ).")
    given = s2.encoder_from_stage1
    path = Path(given) if isinstance(given, str) else run_dir(cfg, "stage1") / "checkpoint.pth"
    if not path.is_file():
        raise ConfigError(f"stage2.encoder_from_stage1: no stage-1 checkpoint at {path}; run "
                          "`python 1_train_stage1.py --config <your config>` first, or set it to false.")
    prefix = "backbone.net."
    state = {key[len(prefix):]: value for key, value in load_checkpoint(path, STAGE1_FORMAT)["model"].items()
             if key.startswith(prefix)}
    try:
        load_encoder_state(model.encoder, s2.encoder, state, f"the stage-1 backbone in {path}", s2.encoder_kwargs)
    except ValueError as error:
        raise CheckpointError(f"stage2.encoder_from_stage1: {error}") from None
    print(f"encoder starts from the stage-1 backbone in {path}")


def weight_kwargs(kwargs):
    """The model kwargs that can change weights: dilation (`output_stride`) changes only how they are applied."""
    return {key: value for key, value in (kwargs or {}).items() if key != "output_stride"}


@torch.no_grad()
def evaluate(model, items, cfg, runtime, save_dirs=None, postprocess=False):
    """Confusion matrices over whole images (this rank's share, summed over ranks), at original resolution:
    (without post-processing, with it or None). save_dirs: (predictions, overlays) folders, where the
    predictions are saved without post-processing."""
    s2, num_classes = cfg.stage2, len(cfg.data.classes)
    fill = class_indices(cfg.data.classes, cfg.postprocess.fill_holes) if postprocess else []
    background = background_index(cfg.data.classes, cfg.data.background)
    net = FlipAveraged(model) if s2.tta_flip else model
    confusion = np.zeros((2, num_classes, num_classes), dtype=np.int64)
    model.eval()
    with BackgroundWriter() as writer:
        for item in tqdm(runtime.shard(items), desc="evaluating", leave=False, disable=not runtime.is_main):
            image, truth = load_pair(item, cfg.data.mask_encoding, num_classes)
            try:
                mask = predict_mask(net, image, runtime, s2.window, s2.overlap, s2.eval_batch_size,
                                    cfg.data.mean, cfg.data.std, num_classes)
            except torch.OutOfMemoryError:
                raise TrainingError(out_of_memory_message("stage2.eval_batch_size")) from None
            confusion[0] += confusion_matrix(mask, truth, num_classes)
            if fill:
                confusion[1] += confusion_matrix(fill_holes(mask, fill), truth, num_classes)
            if save_dirs is not None:
                writer.submit(write_palette_png, save_dirs[0] / f"{item.stem}.png", mask, cfg.data.palette)
                writer.submit(write_overlay, save_dirs[1] / f"{item.stem}.png", image, mask, cfg.data.palette,
                              background)
    confusion = runtime.all_reduce_sum(torch.from_numpy(confusion).to(runtime.device)).cpu().numpy()
    return confusion[0], (confusion[1] if fill else None)


def write_overlay(path, image, mask, palette, background):
    write_rgb(path, overlay(image, mask, palette, background))


def save_test_sheet(path, items, predictions, cfg, count=4):
    """Test images beside their ground truth and prediction: the picture for a results table."""
    rows = []
    background = background_index(cfg.data.classes, cfg.data.background)
    for item in items[:count]:
        image, truth = load_pair(item, cfg.data.mask_encoding, len(cfg.data.classes))
        predicted = read_mask(predictions / f"{item.stem}.png", "index", len(cfg.data.classes))
        rows.append([image, colorize(truth, cfg.data.palette), colorize(predicted, cfg.data.palette),
                     overlay(image, predicted, cfg.data.palette, background)])
    contact_sheet(path, rows, ["image", "ground truth", "prediction", "overlay"], cell=220)


def save_stage2(path, model, cfg, extra):
    save_checkpoint(path, {"format": STAGE2_FORMAT, "model": model.state_dict(), "meta": segmenter_meta(cfg),
                           "config": cfg.to_dict(), **extra})


def segmenter_train_step(trainer, model, criterion, aux_weight, runtime, scaler=None):
    """Forward, IICB loss on both paths and backward of a batch of (images, masks); returns the loss."""
    def forward_loss(images, masks):
        with runtime.autocast():
            outputs = trainer(images)
        main_loss, _ = criterion(outputs["main"].float(), masks)
        if outputs["aux"] is None:
            return (main_loss,)
        aux_loss, _ = criterion(outputs["aux"].float(), masks)
        return (main_loss + aux_weight * aux_loss,)

    return TrainStep(forward_loss, model.parameters(), runtime, scaler)


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


def train_segmenter(cfg, model, runtime, out_dir, val_items, resume):
    s2 = cfg.stage2
    if s2.batch_size % runtime.world_size:
        raise TrainingError(f"stage2.batch_size={s2.batch_size} is not divisible by the {runtime.world_size} "
                            "processes; choose a multiple of the process count.")
    per_rank_batch = s2.batch_size // runtime.world_size
    if s2.epochs == 0:  # score stage2.init_from as it is (the "before" of few-shot adaptation): no training data
        model.to(runtime.device).to(memory_format=torch.channels_last)
        if runtime.is_main:
            begin_record(cfg, out_dir)
            save_stage2(out_dir / "best.pth", model, cfg, {"epoch": 0})
        runtime.barrier()
        return out_dir / "best.pth"
    images, masks, encoding = training_pairs(cfg)
    check_crop_size(s2.crop_size, images, s2.train_on)
    dataset = SegmentationSet(images, masks, s2.crop_size, cfg.data.mean, cfg.data.std, encoding,
                              len(cfg.data.classes), augment=True, seed=cfg.seed,
                              jitter=(s2.hed_jitter, s2.color_jitter), crops_per_image=s2.crops_per_image,
                              scale_jitter=s2.scale_jitter, rotate90=s2.rotate90)
    check_batch_statistics(len(dataset), per_rank_batch, runtime.world_size)
    loader = training_loader(dataset, per_rank_batch, runtime, cfg.seed)
    if runtime.is_main:
        print(f"stage 2 on {len(dataset)} images with {'ground-truth' if encoding != 'index' or s2.train_masks == 'ground_truth' else 'pseudo'} masks")
    if s2.sync_bn and runtime.distributed and runtime.device.type != "cuda":
        if runtime.is_main:  # torch synchronises BatchNorm across GPUs only
            print(f"stage2.sync_bn is ignored on {runtime.device.type}: each process keeps its own BatchNorm "
                  "statistics")
    elif s2.sync_bn and runtime.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(runtime.device).to(memory_format=torch.channels_last)
    optimizer = sgd_with_layer_decay(model, model.encoder, s2.lr, s2.momentum, s2.weight_decay, s2.layer_decay)
    criterion = IICBLoss(**s2.iicb, background=background_index(cfg.data.classes, cfg.data.background))
    total_steps = max(1, s2.epochs * len(loader))
    gated = isinstance(model.refine, RefinementAttention)  # its mean gates go into the log
    log = CsvLog(out_dir / "log.csv", ["epoch", "loss", "val_miou", "val_mdice"]
                 + (["channel_gate", "spatial_gate"] if gated else []) + ["lr", "seconds"], keep_existing=resume)
    scaler = runtime.grad_scaler()
    # the model that is evaluated and kept: the weights' moving average when stage2.ema_decay asks for one
    average = WeightAverage(model, s2.ema_decay) if s2.ema_decay else None
    kept = average.model if average else model
    start_epoch, step, best = 0, 0, -1.0
    last_path, best_path = out_dir / "last.pth", out_dir / "best.pth"
    if resume and last_path.is_file():
        state = load_checkpoint(last_path, STAGE2_FORMAT)
        check_checkpoint_fits(state.get("config"), cfg, "stage2", last_path, "--resume continues it")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        restore_scaler(scaler, state)
        if average is not None and state.get("ema"):
            average.load_state_dict(state["ema"])
        start_epoch, step, best = state["epoch"], state["step"], state["best_miou"]
        log.truncate(start_epoch)
        if runtime.is_main:
            print(f"resuming stage 2 at epoch {start_epoch + 1} of {s2.epochs}")
    trainer = model
    if runtime.distributed:
        trainer = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None if runtime.device.type == "cpu" else [runtime.device])
    if cfg.compile:
        trainer = compile_model(trainer)
    train_step = segmenter_train_step(trainer, model, criterion, s2.aux_weight, runtime, scaler)
    for epoch in range(start_epoch, s2.epochs):
        loader.sampler.set_epoch(epoch)
        model.train()
        started, loss_sum, seen, gate_sum = time.perf_counter(), 0.0, 0, 0.0
        bar = tqdm(loader, desc=f"stage 2 epoch {epoch + 1}/{s2.epochs}", leave=False, disable=not runtime.is_main)
        for batch, target, _ in bar:
            batch = batch.to(runtime.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            target = target.to(runtime.device, non_blocking=True)
            set_poly_lr(optimizer, step, total_steps, s2.poly_power)
            try:
                loss, = train_step(batch, target)
            except torch.OutOfMemoryError:
                raise TrainingError(out_of_memory_message("stage2.batch_size")) from None
            loss_value = loss.item()  # the one host-device sync of a step; no update is made from a bad loss
            check_finite(loss_value, epoch, step, f"the last good checkpoint is {last_path}")
            scaler.step(optimizer)
            scaler.update()
            if average is not None:
                average.update(model)
            if gated:
                gate_sum = gate_sum + torch.stack(model.refine.mean_gates)
            step += 1
            loss_sum, seen = loss_sum + loss_value * len(batch), seen + len(batch)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        runtime.broadcast_buffers(model)  # every rank scores (and rank 0 saves) the same BatchNorm statistics
        runtime.broadcast_buffers(kept)
        loss_sum, seen = runtime.all_reduce_sum(
            torch.tensor([loss_sum, seen], dtype=torch.float64, device=runtime.device)).tolist()
        values = scores(evaluate(kept, val_items, cfg, runtime)[0]) if val_items else None
        improved = values is not None and values["miou"] > best
        if improved:
            best = values["miou"]
        keep = improved if s2.keep_epoch == "best_val" else epoch + 1 == s2.epochs
        row = {"epoch": epoch + 1, "loss": round(loss_sum / max(seen, 1), 5),
               "val_miou": round(values["miou"], 5) if values else "",
               "val_mdice": round(values["mdice"], 5) if values else "",
               "lr": f"{optimizer.param_groups[0]['lr']:.3g}", "seconds": round(time.perf_counter() - started, 1)}
        if gated:
            row["channel_gate"], row["spatial_gate"] = (round(float(g) / max(len(loader), 1), 4) for g in gate_sum)
        if runtime.is_main:
            if epoch == start_epoch:
                begin_record(cfg, out_dir)  # the record changes with the run's first own checkpoint
            log.append(row)
            tqdm.write(f"stage 2 epoch {row['epoch']}: loss {row['loss']}"
                       + (f", val mIoU {row['val_miou']}" if values else "") + (" (best so far)" if improved else ""))
            if keep:
                save_stage2(best_path, kept, cfg, {"epoch": epoch + 1, "val_miou": values["miou"] if values else None})
                save_safetensors(out_dir / "best.safetensors", kept.state_dict(), STAGE2_FORMAT,
                                 segmenter_meta(cfg))
            save_stage2(last_path, model, cfg, {"epoch": epoch + 1, "step": step, "best_miou": best,
                                                "optimizer": optimizer.state_dict(), "rng": rng_state(),
                                                "scaler": scaler.state_dict(),
                                                "ema": average.state_dict() if average else None})
        runtime.barrier()
    return best_path


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="continue training from last.pth")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    normalisation = resolve_normalisation(cfg, "stage2")
    timer = StepTimer("stage2")
    runtime = setup_runtime(cfg)
    out_dir = start_run(cfg, runtime, "stage2")
    num_classes = len(cfg.data.classes)
    val_items = validation_items(cfg)
    held_out = {"val": val_items} if val_items else {}
    tests, missing = test_splits(cfg.data.root, cfg.data.test_splits)
    held_out.update(tests)
    for split, items in held_out.items():
        check_split_masks(items, cfg.data.mask_encoding, num_classes, split)
    if runtime.is_main:
        if normalisation:
            print(normalisation)
        if cfg.stage2.keep_epoch == "last":
            print(f"stage2.keep_epoch: last: the model of epoch {cfg.stage2.epochs} is kept"
                  + ("; val is scored for the log only" if "val" in held_out else
                     f" (no validation images in {cfg.data.root}/val)"))
        for split in missing:
            print(f"test split '{split}' is not in {cfg.data.root} (no {split}/img folder); skipped.")

    model = build_segmenter(cfg)
    best_path = train_segmenter(cfg, model, runtime, out_dir, val_items, args.resume)
    best = load_checkpoint(best_path, STAGE2_FORMAT)
    model.load_state_dict(best["model"])
    metrics, postprocessed = {}, {}
    for split, items in held_out.items():
        save_dirs = None if split == "val" else (out_dir / "predictions" / split, out_dir / "overlays" / split)
        raw, cleaned = evaluate(model, items, cfg, runtime, save_dirs, postprocess=True)
        metrics[split] = scores(raw)
        if cleaned is not None:
            postprocessed[split] = scores(cleaned)
    steps = describe(cfg.data.classes, class_indices(cfg.data.classes, cfg.postprocess.fill_holes))
    if postprocessed:
        metrics["postprocessed"] = {"steps": steps, **postprocessed}
    metrics["images"] = {split: [item.stem for item in items] for split, items in held_out.items()}
    metrics["best_epoch"] = best.get("epoch")
    metrics["selected_by"] = ("validation mIoU without post-processing" if cfg.stage2.keep_epoch == "best_val"
                              else "the last epoch (stage2.keep_epoch: last)")
    if runtime.is_main:
        first_test = next(iter(tests), None)
        if first_test is not None:
            save_test_sheet(out_dir / "test_samples.png", tests[first_test], out_dir / "predictions" / first_test,
                            cfg)
        begin_record(cfg, out_dir)  # again: a resumed, finished run is scored with the settings in force
        write_json(out_dir / "metrics.json", metrics)
        for split in held_out:
            line = f"stage 2 on {split}: mIoU {metrics[split]['miou']:.4f}, Dice {metrics[split]['mdice']:.4f}"
            if split in postprocessed:
                line += (f"; with {steps}: mIoU {postprocessed[split]['miou']:.4f}, "
                         f"Dice {postprocessed[split]['mdice']:.4f}")
            print(line)
        write_json(out_dir / RUN_RECORD, timer.record(runtime.device, runtime.world_size, resumed=bool(args.resume)))
        print(f"stage 2 outputs in {out_dir} ({timer.seconds / 60:.1f} min)")
    cleanup(runtime)
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
