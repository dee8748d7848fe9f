"""Stage 1: train the classifier with Implicit Boundary Mining on image-level labels, then turn its
multi-layer class activation maps into pseudo-masks on disk.

    python 1_train_stage1.py --config configs/glas.yaml [--set stage1.epochs=3] [--resume]

Writes runs/<name>/stage1/{config.yaml, checkpoint.pth, log.csv, metrics.json, run.json, samples.png} and
one pseudo-mask per training image into data.pseudo_mask_dir.
"""
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.classifier import ClassifierEnsemble, Stage1Classifier, build_backbone
from utils.checkpoint import STAGE1_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from utils.cli import run_main
from utils.config import ConfigError, base_parser, load_config, pseudo_mask_dir, run_dir
from utils.cuda_graphs import TrainStep
from utils.data.datasets import (ClassificationSet, check_split_masks, split_items, test_splits, train_items,
                                 training_loader, training_tile_size)
from utils.evaluation.metrics import scores
from utils.evaluation.postprocess import class_indices, describe
from utils.files import write_json
from utils.provenance import RUN_RECORD, StepTimer
from utils.run_folder import begin_record, check_checkpoint_fits, check_resumed_epochs, stage1_checkpoint_to_use
from utils.runtime import cleanup, compile_model, setup_runtime, start_run, unwrap
from utils.stage1.mask_writing import save_samples, write_pseudo_masks, write_whole_images
from utils.stage1.pseudo_masks import check_averaged_checkpoints, masks_checkpoint_sha
from utils.stage1.refinement import check_refinement, label_refiner
from utils.stage1.scoring import score_whole_images
from utils.timm_settings import check_vit_settings, inspect_network, resolve_normalisation
from utils.training import (CsvLog, TrainingError, check_finite, freeze_batchnorm, layer_decay_scales,
                            out_of_memory_message, restore_scaler, rng_state, set_poly_lr, set_rng_state,
                            sgd_with_multipliers)
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
    model = Stage1Classifier(backbone, len(cfg.data.classes), use_ibm=s1.ibm, ibm_at=s1.ibm_at,
                             ibm_edge_from=s1.ibm_edge_from)
    if s1.ibm and model.ibm_at != s1.ibm_at:
        print(f"stage1.ibm_at: {s1.backbone} is a Vision Transformer, whose blocks read tokens; IBM acts on its "
              "deepest tap")
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


def new_layer_groups(model, s1):
    """The new layers and their learning-rate multipliers. As published, only the deep head (fc8) learns at
    stage1.lr_mult_new; IBM and the side heads (ic1, ic2) learn as pretrained layers do (x1 / x2) unless
    stage1.ibm_lr_mult and stage1.side_head_lr_mult say otherwise."""
    new = model.new_modules()
    return [(new["ibm"], s1.ibm_lr_mult), (new["side_heads"], s1.side_head_lr_mult), (new["head"], s1.lr_mult_new)]


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
    optimizer = sgd_with_multipliers([model.backbone], new_layer_groups(model, s1), s1.lr, s1.momentum,
                                     s1.weight_decay, layer_decay_scales(model.backbone, s1.layer_decay))
    total_steps = max(1, s1.epochs * len(loader))
    checkpoint_path = out_dir / "checkpoint.pth"
    log = CsvLog(out_dir / "log.csv", ["epoch", "loss", "accuracy", "grad_norm", "clipped", "lr", "seconds"],
                 keep_existing=resume)
    scaler = runtime.grad_scaler()
    start_epoch, step = 0, 0
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, STAGE1_FORMAT)
        load_weights(model, state, cfg, checkpoint_path, "--resume continues it")
        check_resumed_epochs(state["epoch"], s1.epochs, checkpoint_path, "stage1.epochs")
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            restore_scaler(scaler, state)
        start_epoch, step = state["epoch"], state["step"]
        log.truncate(start_epoch)
        if runtime.is_main:
            print(f"resuming stage 1 at epoch {start_epoch + 1} of {s1.epochs}" if start_epoch < s1.epochs else
                  f"stage 1: {checkpoint_path} has finished its {s1.epochs} epochs; nothing left to train")
    elif resume and runtime.is_main:
        print(f"--resume: no {checkpoint_path} to continue; stage 1 starts at epoch 1")
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
        correct, norm_sum, clipped = 0, 0.0, 0  # the gradient norm before clipping, and how often it clips
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
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s1.grad_clip).detach().float()
            norm_sum, clipped = norm_sum + norm, clipped + (norm > s1.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            totals += torch.tensor([loss_value * len(images), 0, labels.numel(), len(images)], dtype=torch.float64)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        totals[1] = float(correct)
        totals = runtime.all_reduce_sum(totals.to(runtime.device)).cpu()
        seconds = time.perf_counter() - started
        steps = max(len(loader), 1)
        row = {"epoch": epoch + 1, "loss": round(totals[0].item() / max(totals[3].item(), 1), 5),
               "accuracy": round(totals[1].item() / max(totals[2].item(), 1), 5),
               "grad_norm": round(float(norm_sum) / steps, 4), "clipped": round(float(clipped) / steps, 4),
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


def averaging_partners(cfg, model, own_checkpoint):
    """The classifiers of stage1.average_cams_with, loaded before any training so that a bad file costs no
    training time; their class maps are averaged with this run's. Each is a copy of the untrained `model`
    given those weights, so the pretrained weights are not read again."""
    check_averaged_checkpoints(cfg.stage1.average_cams_with)
    partners = []
    for path in map(Path, cfg.stage1.average_cams_with):
        if path.resolve() == own_checkpoint.resolve():
            raise ConfigError(f"stage1.average_cams_with names this run's own checkpoint {path}; name the other "
                              "runs' checkpoints only.")
        partner = copy.deepcopy(model)
        load_weights(partner, load_checkpoint(path, STAGE1_FORMAT), cfg, path,
                     "class maps are averaged")
        partners.append(partner)
    return partners


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="continue training from checkpoint.pth")
    parser.add_argument("--masks-only", action="store_true",
                        help="skip training; write pseudo-masks from the existing checkpoint.pth")
    parser.add_argument("--overwrite", action="store_true", help="rewrite pseudo-masks that already exist")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_refinement(cfg.stage1)
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
    partners = averaging_partners(cfg, model, checkpoint_path)
    if train:
        train_classifier(cfg, model, items, runtime, out_dir, args.resume)
    else:
        state = load_checkpoint(checkpoint_path, STAGE1_FORMAT)
        load_weights(model, state, cfg, checkpoint_path, "a checkpoint is used as it is")
        cfg.stage1.epochs = state["epoch"]  # the record then describes the checkpoint beside it
        if runtime.is_main:
            print(f"no training: {checkpoint_path} (epoch {state['epoch']}) is used as it is")
    model = unwrap(model)
    if partners:
        model = ClassifierEnsemble([model] + partners)
        if runtime.is_main:
            print(f"class maps averaged over {len(partners) + 1} classifiers: {checkpoint_path} and "
                  f"{', '.join(cfg.stage1.average_cams_with)}")
    model = model.to(runtime.device).to(memory_format=torch.channels_last)
    checkpoint_sha = masks_checkpoint_sha(checkpoint_path, cfg.stage1.average_cams_with)

    confusion, samples, skipped, stitcher = write_pseudo_masks(cfg, model, items, runtime, checkpoint_sha,
                                                               args.overwrite)
    metrics, postprocessed, refined = {}, {}, {}
    if any(item.mask is not None for item in items):
        metrics["train"] = scores(confusion)
    tile = training_tile_size([item.image for item in items])
    # Optional steps between the class maps and the pseudo-masks (affinity propagation, dense CRF), fitted on the
    # stitched training images, then applied to them and to every whole image scored below.
    refiner = label_refiner(cfg, model, runtime)
    if stitcher is not None:
        whole = write_whole_images(cfg, stitcher, runtime, checkpoint_sha, refiner, cfg.stage1.image_size / max(tile))
        if whole is not None:
            metrics["train_whole"] = scores(whole[1] if refiner is not None else whole[0])
            if refiner is not None:
                refined["train_whole"] = scores(whole[0])
    if runtime.is_main and any(held_out.values()):
        print(f"whole images are scored over {tile[1]}x{tile[0]} px tiles (the training tiles' size), half "
              "overlapping, each seen as the classifier was trained")
    for split, split_list in held_out.items():
        if split_list:
            raw, cleaned, refined_raw, refined_cleaned = score_whole_images(cfg, model, split_list, runtime, tile,
                                                                            refiner)
            metrics[split] = scores(raw)
            if cleaned is not None:
                postprocessed[split] = scores(cleaned)
            if refined_raw is not None:
                refined[split] = scores(refined_raw)
                if refined_cleaned is not None:
                    refined.setdefault("postprocessed", {})[split] = scores(refined_cleaned)
    steps = describe(cfg.data.classes, class_indices(cfg.data.classes, cfg.postprocess.fill_holes))
    if postprocessed:
        metrics["postprocessed"] = {"steps": steps, **postprocessed}
    if refiner is not None:
        metrics["refined"] = {"steps": ", ".join(refiner.steps), **refined}
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
        for split in [s for s in refined if s != "postprocessed"]:
            print(f"pseudo-masks on {split} after {', '.join(refiner.steps)}: mIoU {refined[split]['miou']:.4f}"
                  + (f"; with {steps}: mIoU {refined['postprocessed'][split]['miou']:.4f}"
                     if split in refined.get("postprocessed", {}) else ""))
        if "train_whole" in metrics:
            print(f"whole training images' pseudo-masks{' before refinement' if refiner else ''}: mIoU "
                  f"{metrics['train_whole']['miou']:.4f}")
        print(f"pseudo-masks written to {pseudo_mask_dir(cfg)}" + (f" ({skipped} kept from before)" if skipped else ""))
        write_json(out_dir / RUN_RECORD, timer.record(runtime.device, runtime.world_size,
                                                       resumed=bool(args.resume), masks_only=bool(args.masks_only)))
        print(f"stage 1 outputs in {out_dir} ({timer.seconds / 60:.1f} min)")
    cleanup(runtime)
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
