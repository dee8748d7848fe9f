"""Stage 2's training loop: DPR trained with the IICB loss on both paths, scored on val after each epoch, the
kept epoch and the last one saved (the last with all it needs to resume)."""
import time

import torch
from tqdm import tqdm

from models.dpr import RefinementAttention
from utils.checkpoint import STAGE2_FORMAT, load_checkpoint, save_checkpoint, save_safetensors
from utils.config import background_index
from utils.cuda_graphs import TrainStep
from utils.data.datasets import SegmentationSet, training_loader
from utils.evaluation.metrics import scores
from utils.run_folder import begin_record, check_checkpoint_fits, check_resumed_epochs, check_resumed_rounds
from utils.runtime import compile_model
from utils.stage2.evaluation import evaluate
from utils.stage2.losses import IICBLoss
from utils.stage2.predict import segmenter_meta
from utils.stage2.training_data import check_batch_statistics, check_crop_size, training_pairs
from utils.training import (CsvLog, TrainingError, WeightAverage, check_finite, out_of_memory_message, restore_scaler,
                            rng_state, set_poly_lr, set_rng_state, sgd_with_layer_decay)


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


def train_segmenter(cfg, model, runtime, out_dir, val_items, resume, pairs=None, epochs=None, round_label=""):
    """Train `model` into out_dir for `epochs` (stage2.epochs) on `pairs` (images, masks, mask encoding; the
    config's training_pairs when None); returns the kept model's file. `round_label` names a self-training
    round in progress lines."""
    s2 = cfg.stage2
    if s2.batch_size % runtime.world_size:
        raise TrainingError(f"stage2.batch_size={s2.batch_size} is not divisible by the {runtime.world_size} "
                            "processes; choose a multiple of the process count.")
    per_rank_batch = s2.batch_size // runtime.world_size
    epochs = s2.epochs if epochs is None else epochs
    if epochs == 0:  # score stage2.init_from as it is (the "before" of few-shot adaptation): no training data
        model.to(runtime.device).to(memory_format=torch.channels_last)
        if runtime.is_main:
            begin_record(cfg, out_dir)
            save_stage2(out_dir / "best.pth", model, cfg, {"epoch": 0})
        runtime.barrier()
        return out_dir / "best.pth"
    images, masks, encoding = pairs or training_pairs(cfg)
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
    total_steps = max(1, epochs * len(loader))
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
        check_resumed_rounds(state.get("config"), cfg.stage2.rounds, last_path)
        check_resumed_epochs(state["epoch"], epochs, last_path, "stage2.epochs" if not round_label else
                             "stage2.round_epochs")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        restore_scaler(scaler, state)
        if average is not None and state.get("ema"):
            average.load_state_dict(state["ema"])
        start_epoch, step, best = state["epoch"], state["step"], state["best_miou"]
        log.truncate(start_epoch)
        if runtime.is_main:
            print(f"resuming stage 2{round_label} at epoch {start_epoch + 1} of {epochs}" if start_epoch < epochs else
                  f"stage 2{round_label}: {last_path} has finished its {epochs} epochs; nothing left to train")
    elif resume and runtime.is_main:
        print(f"--resume: no {last_path} to continue; stage 2{round_label} starts at epoch 1")
    trainer = model
    if runtime.distributed:
        trainer = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None if runtime.device.type == "cpu" else [runtime.device])
    if cfg.compile:
        trainer = compile_model(trainer)
    train_step = segmenter_train_step(trainer, model, criterion, s2.aux_weight, runtime, scaler)
    for epoch in range(start_epoch, epochs):
        loader.sampler.set_epoch(epoch)
        model.train()
        started, loss_sum, seen, gate_sum = time.perf_counter(), 0.0, 0, 0.0
        bar = tqdm(loader, desc=f"stage 2{round_label} epoch {epoch + 1}/{epochs}", leave=False,
                   disable=not runtime.is_main)
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
        keep = improved if s2.keep_epoch == "best_val" else epoch + 1 == epochs
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
