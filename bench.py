"""Speed and memory of the steps users wait for, on synthetic data.

    python bench.py            # paper settings: ResNet-38 + IBM (batch 20, 224 px), ResNeSt-200e DPR (batch 16)
    python bench.py --quick    # small networks and images: a minute or two on a laptop CPU
    python bench.py --config configs/glas_cpu.yaml --only stage1_train stage2_train   # a config's networks
    python bench.py --config configs/glas_imagenet_cpu.yaml --set precision=bf16       # ... with a setting changed

Prints one line per figure (images/s, peak memory, model-FLOPs utilisation for the training steps) and
writes the same to bench.json. (a) stage-1 training step, (b) CAMs + pseudo-masks end to end from PNG tiles
on disk to PNG masks on disk, (c) stage-2 training step, (d) inference end to end from PNG tiles to PNG masks,
(e) a whole slide end to end, from a generated pyramidal 40x slide (40,000 px square, about 30% tissue;
6,144 px with --quick) to its GeoJSON, PNG and pyramidal TIFF masks, beside the model-only rate on the same
tiles, in one run. The full-size slide takes about 1.5 GB of temporary disk and 40 s to generate.
The ViT figures time (a) and (c) with a ViT-L/16 encoder (the size of UNI; random weights, the speed is the
same), its whole network trained and with the encoder frozen: stage1_train_vit, stage2_train_vit, and the
same with _frozen (`--only stage1_train_vit stage2_train_vit` runs two of them).
"""
import argparse
import csv
import importlib
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml

from utils.cli import USER_ERRORS, run_main
from utils.config import load_config
from utils.files import write_json
from utils.measure import peak_memory_gib, reset_memory, synchronize, training_figure
from utils.runtime import compile_model, setup_runtime
from utils.stage2.network import build_segmenter
from utils.stage2.training import segmenter_train_step
from utils.timm_settings import resolve_normalisation

# The generated slide: a 40x scan (0.25 um/px) read by a model trained at 20x (0.5 um/px), so tiles are read
# at level 0 and shrunk 2x, as with most .svs files, whose levels are 4x apart.
SLIDE = {"mpp": 0.25, "model_mpp": 0.5, "tissue": 0.3, "tile": 256, "level_factor": 4, "texture": 1024,
         "warmup_size": 2048}

FULL = {"stage1_backbone": "resnet38", "stage1_batch": 20, "stage1_size": 224, "stage1_steps": 12,
        "cam_tiles": 2000, "cam_tile_size": 112, "cam_batch": 64,
        "stage2_encoder": "resnest200e", "stage2_batch": 16, "stage2_size": 224, "stage2_steps": 15,
        "infer_tiles": 2000, "infer_size": 224, "infer_batch": 64,
        "slide_size": 40000, "slide_model_tiles": 3200}
# ViT figures: the encoder of UNI, Virchow and most pathology foundation models is this size or larger.
FULL_VIT = {"vit": "vit_large_patch16_224", "vit_kwargs": {}, "vit_stage1_batch": 20, "vit_stage2_batch": 16,
            "vit_size": 224}
QUICK_VIT = {"vit": "vit_tiny_patch16_224", "vit_kwargs": {"depth": 3}, "vit_stage1_batch": 4,
             "vit_stage2_batch": 4, "vit_size": 64}
FIGURES = ("stage1_train", "cam_pseudo_masks", "stage2_train", "inference", "slide", "stage1_train_vit",
           "stage1_train_vit_frozen", "stage2_train_vit", "stage2_train_vit_frozen")
QUICK = {"stage1_backbone": "resnet10t", "stage1_batch": 4, "stage1_size": 64, "stage1_steps": 3,
         "cam_tiles": 32, "cam_tile_size": 48, "cam_batch": 16,
         "stage2_encoder": "resnet10t", "stage2_batch": 4, "stage2_size": 64, "stage2_steps": 3,
         "infer_tiles": 32, "infer_size": 64, "infer_batch": 16,
         "slide_size": 6144, "slide_model_tiles": 512}


def bench_stage1_training(cfg, runtime, s):
    stage1 = importlib.import_module("1_train_stage1")
    from utils.training import freeze_batchnorm, sgd_with_multipliers
    model = stage1.build_classifier(cfg).to(runtime.device).to(memory_format=torch.channels_last)
    stage1.freeze_stem(model, cfg.stage1)
    model.train()
    if cfg.stage1.freeze_bn:
        freeze_batchnorm(model)
    trainer = compile_model(model) if cfg.compile else model
    optimizer = sgd_with_multipliers([model.backbone], stage1.new_layer_groups(model, cfg.stage1), 0.01, 0.9, 5e-4)
    scaler = runtime.grad_scaler()
    train_step = stage1.classifier_train_step(trainer, model, cfg.stage1, runtime, scaler)
    images = torch.randn(s["stage1_batch"], 3, s["stage1_size"], s["stage1_size"], device=runtime.device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (s["stage1_batch"], len(cfg.data.classes)), device=runtime.device).float()

    def step():  # as in 1_train_stage1.py, without the host-side loss check
        train_step(images, labels)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(optimizer)
        scaler.update()

    return training_figure("stage1_train", step, s["stage1_batch"], s["stage1_steps"], runtime, s["profile"]), model


def write_tiles(folder, count, size, labelled):
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size * 2, size * 2, 3), dtype=np.uint8)

    def one(index):
        y, x = (index * 7) % size, (index * 13) % size
        name = f"tile_{index:05d}[1, 1].png" if labelled else f"tile_{index:05d}.png"
        Image.fromarray(base[y:y + size, x:x + size]).save(folder / name)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def bench_pseudo_masks(cfg, runtime, s, model, workdir):
    from utils.data.datasets import train_items
    from utils.stage1.mask_writing import write_pseudo_masks
    root = workdir / "cam"
    write_tiles(root / "train" / "img", s["cam_tiles"], s["cam_tile_size"], labelled=True)
    cfg.data.root = str(root)
    cfg.stage1.cam_batch_size = s["cam_batch"]
    cfg.stage1.cam_flip = False
    items = train_items(root, len(cfg.data.classes))
    model.eval()
    reset_memory(runtime.device)
    write_pseudo_masks(cfg, model, items[:s["cam_batch"]], runtime, "warmup", overwrite=True)
    synchronize(runtime.device)
    started = time.perf_counter()
    write_pseudo_masks(cfg, model, items, runtime, "bench", overwrite=True)
    synchronize(runtime.device)
    seconds = time.perf_counter() - started
    written = len(list((root / "train" / "pseudo_mask").glob("*.png")))
    return {"figure": "cam_pseudo_masks", "images_per_s": written / seconds, "images": written,
            "peak_mem_gib": peak_memory_gib(runtime.device)}


def bench_stage2_training(cfg, runtime, s):
    from utils.stage2.losses import IICBLoss
    from utils.training import sgd_with_layer_decay
    model = build_segmenter(cfg).to(runtime.device).to(memory_format=torch.channels_last)
    model.train()
    trainer = compile_model(model) if cfg.compile else model
    optimizer = sgd_with_layer_decay(model, model.encoder, 0.01, 0.9, 5e-4, cfg.stage2.layer_decay)
    scaler = runtime.grad_scaler()
    train_step = segmenter_train_step(trainer, model, IICBLoss(), 0.4, runtime, scaler)
    size = s["stage2_size"]
    images = torch.randn(s["stage2_batch"], 3, size, size, device=runtime.device)
    images = images.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, len(cfg.data.classes), (s["stage2_batch"], size, size), device=runtime.device)

    def step():  # as in 2_train_stage2.py, without the host-side loss check
        train_step(images, target)
        scaler.step(optimizer)
        scaler.update()

    return training_figure("stage2_train", step, s["stage2_batch"], s["stage2_steps"], runtime, s["profile"]), model


def bench_inference(cfg, runtime, s, model, workdir):
    from utils.checkpoint import STAGE2_FORMAT, save_checkpoint
    from utils.stage2.predict import segmenter_meta
    inference = importlib.import_module("inference")
    cfg.stage2.encoder = s["stage2_encoder"]
    cfg.stage2.window = s["infer_size"]
    checkpoint = workdir / "stage2.pth"
    save_checkpoint(checkpoint, {"format": STAGE2_FORMAT, "model": model.state_dict(), "meta": segmenter_meta(cfg)})
    tiles = workdir / "tiles"
    write_tiles(tiles, s["infer_tiles"], s["infer_size"], labelled=False)
    args = ["--checkpoint", str(checkpoint), "--input", str(tiles), "--device", str(runtime.device),
            "--batch-size", str(s["infer_batch"]), "--overwrite"]
    warm = workdir / "warm"
    write_tiles(warm, s["infer_batch"], s["infer_size"], labelled=False)
    inference.main(["--checkpoint", str(checkpoint), "--input", str(warm), "--output", str(workdir / "warm_out"),
                    "--device", str(runtime.device), "--batch-size", str(s["infer_batch"])])
    reset_memory(runtime.device)
    started = time.perf_counter()
    inference.main(args + ["--output", str(workdir / "infer_out")])
    seconds = time.perf_counter() - started
    written = len(list((workdir / "infer_out").glob("*_mask.png")))
    return {"figure": "inference", "images_per_s": written / seconds, "images": written,
            "peak_mem_gib": peak_memory_gib(runtime.device)}


def vit_config(common, s, frozen):
    """Both stages with the ViT encoder: its last block decoded by DPR, three blocks tapped in stage 1."""
    kwargs = yaml.safe_dump(s["vit_kwargs"], default_flow_style=True).strip()
    size = s["vit_size"]
    return load_config(None, common + [
        f"stage1.backbone={s['vit']}", f"stage1.backbone_kwargs={kwargs}", f"stage1.image_size={size}",
        f"stage1.freeze_encoder={frozen}", "stage1.freeze_bn=false", "stage1.freeze_stem=false",
        f"stage2.encoder={s['vit']}", f"stage2.encoder_kwargs={kwargs}", f"stage2.crop_size={size}",
        f"stage2.window={size}", f"stage2.freeze_encoder={frozen}"])


def bench_vit(name, common, runtime, s):
    """A ViT figure: the stage-1 or stage-2 training step with the ViT encoder, trained or frozen."""
    frozen = name.endswith("_frozen")
    cfg = vit_config(common, s, frozen)
    resolve_normalisation(cfg, "stage1")
    size = s["vit_size"]
    if name.startswith("stage1"):
        settings = dict(s, stage1_batch=s["vit_stage1_batch"], stage1_size=size)
        result, _ = bench_stage1_training(cfg, runtime, settings)
    else:
        settings = dict(s, stage2_batch=s["vit_stage2_batch"], stage2_size=size)
        result, _ = bench_stage2_training(cfg, runtime, settings)
    result.update(figure=name, encoder=s["vit"], batch=settings[f"{name[:6]}_batch"], image_size=size)
    return result


# ----- (e) a whole slide --------------------------------------------------------------------------------
def bench_slide(cfg, runtime, s, model, workdir):
    """One generated slide: model-only tiles/s on its tissue tiles (before and after), and end to end."""
    from utils.checkpoint import STAGE2_FORMAT, save_checkpoint
    from utils.cuda_graphs import GraphedForward
    from utils.data.synthetic_tissue import render_tissue
    from utils.slides.slide import Slide, choose_resolution, plan_tiles, read_tile_batches
    from utils.slides.synthetic import write_synthetic_slide
    from utils.stage2.predict import load_segmenter, segmenter_meta
    inference = importlib.import_module("inference")
    cfg.stage2.encoder = s["stage2_encoder"]
    cfg.stage2.window = s["infer_size"]
    cfg.data.mpp = SLIDE["model_mpp"]
    checkpoint = workdir / "slide_model.pth"
    save_checkpoint(checkpoint, {"format": STAGE2_FORMAT, "model": model.state_dict(), "meta": segmenter_meta(cfg)})

    started = time.perf_counter()
    texture, _ = render_tissue(np.random.default_rng(0), SLIDE["texture"], SLIDE["texture"], "glands")
    scan = {key: SLIDE[key] for key in ("mpp", "tissue", "tile", "level_factor")}
    tissue = write_synthetic_slide(workdir / "slide" / "bench.tif", s["slide_size"], texture, **scan)
    write_synthetic_slide(workdir / "slide_warmup" / "warmup.tif", SLIDE["warmup_size"], texture, **scan, seed=1)
    generated = time.perf_counter() - started
    batch = s["infer_batch"]

    def run_inference(folder):
        out = workdir / (folder + "_out")
        argv = ["--checkpoint", str(checkpoint), "--input", str(workdir / folder), "--output", str(out),
                "--device", str(runtime.device), "--batch-size", str(batch), "--mask-format", "tiff", "--overwrite"]
        begun = time.perf_counter()
        inference.main(argv)
        seconds = time.perf_counter() - begun
        with open(out / "summary.csv", newline="") as handle:
            row = next(csv.DictReader(handle))
        if row["status"] != "ok":
            raise RuntimeError(f"the slide failed: {row['status']}")
        return row, seconds

    # the tiles inference reads, chosen the same way; the model alone on them, as inference calls it
    loaded, meta = load_segmenter(checkpoint, runtime.device)
    forward = GraphedForward(loaded, runtime)
    with Slide(workdir / "slide" / "bench.tif") as slide:
        resolution = choose_resolution(slide, model_mpp=meta["mpp"])
        plan = plan_tiles(slide, meta["window"], meta["overlap"], resolution)
        sample = plan.tiles[:s["slide_model_tiles"]]
        batches = [images for _, images in read_tile_batches(slide, sample, resolution, meta["window"], batch)]

    def model_only():
        for images in batches[:3]:  # warm-up (and, on GPUs, the graph capture)
            inference.predict_tile_batch(forward, list(images), runtime, meta["window"], meta["mean"], meta["std"],
                                         batch)
        synchronize(runtime.device)
        begun = time.perf_counter()
        for images in batches:
            inference.predict_tile_batch(forward, list(images), runtime, meta["window"], meta["mean"], meta["std"],
                                         batch)
        synchronize(runtime.device)
        return sum(len(images) for images in batches) / (time.perf_counter() - begun)

    # Inside the end-to-end run, the time its forward passes take (the same calls, timed where they are made):
    # the model's share of the slide's time, measured under the same load as the rest of the run.
    in_run = {"seconds": 0.0}
    slide_running = importlib.import_module("utils.inference.slides")  # where the slide's batches are predicted
    predict_tile_batch = slide_running.predict_tile_batch

    def timed_predict(*args):
        synchronize(runtime.device)
        begun = time.perf_counter()
        logits = predict_tile_batch(*args)
        synchronize(runtime.device)
        in_run["seconds"] += time.perf_counter() - begun
        return logits

    run_inference("slide_warmup")
    reset_memory(runtime.device)
    before = model_only()
    slide_running.predict_tile_batch = timed_predict
    try:
        row, command_seconds = run_inference("slide")
    finally:
        slide_running.predict_tile_batch = predict_tile_batch
    after = model_only()
    model_rate = (before + after) / 2  # the model-only rate is taken on both sides of the end-to-end run
    tiles, slide_seconds = int(row["tiles_predicted"]), float(row["seconds"])
    end_to_end = tiles / slide_seconds
    return {"figure": "slide", "images_per_s": end_to_end, "model_only_images_per_s": model_rate,
            "model_only_before_after": [before, after], "end_to_end_over_model_only": end_to_end / model_rate,
            "model_share_of_slide_seconds": in_run["seconds"] / slide_seconds,
            "seconds_per_slide": slide_seconds, "command_seconds": command_seconds, "tiles": tiles,
            "tiles_total": int(row["tiles_total"]), "slide_px": s["slide_size"], "tissue_fraction": tissue,
            "analysed_at": f"{row['analysis_mpp']} um/px", "window": meta["window"], "batch": batch,
            "generate_seconds": generated, "peak_mem_gib": peak_memory_gib(runtime.device)}


def describe(result):
    if result["figure"] == "slide":
        return (f"{'slide':<17} {result['images_per_s']:9.1f} tiles/s end to end, "
                f"{result['model_only_images_per_s']:.1f} tiles/s model only: "
                f"{100 * result['end_to_end_over_model_only']:.0f}% (the model busy "
                f"{100 * result['model_share_of_slide_seconds']:.0f}% of the slide's time); "
                f"{result['seconds_per_slide']:.1f} s per slide "
                f"({result['command_seconds']:.1f} s with start-up), {result['tiles']} tiles of {result['window']} px, "
                f"{result['slide_px']} px square slide with {100 * result['tissue_fraction']:.0f}% tissue analysed at "
                f"{result['analysed_at']}"
                + ("" if result.get("peak_mem_gib") is None else f", peak memory {result['peak_mem_gib']:.2f} GiB"))
    parts = [f"{result['figure']:<23} {result['images_per_s']:9.1f} images/s"]
    if result.get("peak_mem_gib") is not None:
        parts.append(f"peak memory {result['peak_mem_gib']:.2f} GiB")
    if result.get("tflop_per_step") is not None:
        parts.append(f"{result['tflop_per_step']:.2f} TFLOP/step")
    if result.get("mfu") is not None:
        parts.append(f"MFU {100 * result['mfu']:.1f}%")
    return ", ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings for a CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the training models")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run training steps eagerly on GPUs too")
    parser.add_argument("--profile", action="store_true", help="print the top operators of the training steps")
    parser.add_argument("--only", nargs="*", default=None, choices=FIGURES, metavar="FIGURE",
                        help=f"run only these: {' '.join(FIGURES)}")
    parser.add_argument("--config", default=None,
                        help="time the networks, image sizes and batch sizes of this dataset YAML instead")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the config, e.g. --set stage1.frozen_stages=3 (repeatable)")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args(argv)
    s = dict(QUICK if args.quick else FULL, **(QUICK_VIT if args.quick else FULL_VIT), profile=args.profile)
    # labelled with the options they come from, which messages then name
    common = [(f"device={args.device}", f"--device {args.device}"), f"compile={args.compile}",
              f"cuda_graphs={not args.no_cuda_graphs}", "num_workers=-1"]
    if args.precision != "auto" or args.config is None:  # else the config's own precision stands
        common.append((f"precision={args.precision}", f"--precision {args.precision}"))
    if args.config:
        # random weights: the speed is the same, and nothing has to be downloaded or trained first
        cfg = load_config(args.config, common + ["stage1.pretrained=false", "stage2.pretrained=false",
                                                 "stage2.encoder_from_stage1=false"] + args.overrides)
        s.update(stage1_backbone=cfg.stage1.backbone, stage1_batch=cfg.stage1.batch_size,
                 stage1_size=cfg.stage1.image_size, stage2_encoder=cfg.stage2.encoder,
                 stage2_batch=cfg.stage2.batch_size, stage2_size=cfg.stage2.crop_size)
    else:
        cfg = load_config(None, common + [f"stage1.backbone={s['stage1_backbone']}", "stage1.out_indices=[1,2,3]",
                                          "stage1.freeze_bn=true", f"stage2.encoder={s['stage2_encoder']}"]
                          + args.overrides)
    resolve_normalisation(cfg, "stage1")
    runtime = setup_runtime(cfg)
    wanted = set(args.only or FIGURES)
    device_name = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else platform.processor() or "cpu"
    header = {"device": device_name, "torch": torch.__version__, "precision": str(runtime.amp_dtype or "fp32"),
              "settings": "quick" if args.quick else "full", "config": args.config,
              "world_size": runtime.world_size, "compile": args.compile, "cuda_graphs": runtime.cuda_graphs,
              "threads": torch.get_num_threads()}
    settings = f"{args.config}'s networks" if args.config else f"{header['settings']} settings"
    print(f"bench on {device_name} (torch {torch.__version__}, {header['precision']}, {settings}"
          f"{', CUDA graphs' if runtime.cuda_graphs else ''}{', torch.compile' if args.compile else ''})")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        stage1_model = stage2_model = None
        for name in FIGURES:
            if name not in wanted:
                continue
            try:
                if "_vit" in name:
                    stage1_model = stage2_model = None  # their memory must not count in the ViT figures
                    result = bench_vit(name, common, runtime, s)
                elif name == "stage1_train":
                    result, stage1_model = bench_stage1_training(cfg, runtime, s)
                elif name == "cam_pseudo_masks":
                    if stage1_model is None:
                        stage1_model = importlib.import_module("1_train_stage1").build_classifier(cfg).to(runtime.device)
                    result = bench_pseudo_masks(cfg, runtime, s, stage1_model, workdir)
                    stage1_model = None
                elif name == "stage2_train":
                    result, stage2_model = bench_stage2_training(cfg, runtime, s)
                else:
                    if stage2_model is None:
                        stage2_model = build_segmenter(cfg)
                    run = bench_inference if name == "inference" else bench_slide
                    result = run(cfg, runtime, s, stage2_model.eval(), workdir)
            except USER_ERRORS:  # a setting the user can fix stops the bench with its sentence
                raise
            except Exception as error:  # one failing figure must not hide the others
                traceback.print_exc()
                result = {"figure": name, "error": f"{type(error).__name__}: {error}"}
                print(f"{name:<23} failed: {result['error']}")
            else:
                if runtime.is_main:
                    print(describe(result), flush=True)
            results.append(result)
    if runtime.is_main:
        write_json(args.out, {**header, "results": results})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
