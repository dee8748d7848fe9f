"""Segment tiles, large images and whole-slide images with a stage-2 checkpoint.

    python inference.py --checkpoint runs/demo/stage2/best.pth --input DIR_OR_FILE --output DIR

Writes <stem>_mask.png (class indices, palette colours) and <stem>_overlay.png per image; slides are
analysed at the model's own microns per pixel and get a mask at --downsample, an overlay .jpg on the
thumbnail, <stem>.geojson (QuPath annotations, level-0 pixels) and, with --mask-format tiff, a pyramidal
<stem>_mask.tif for slide viewers. summary.csv has one row per input. Under torchrun each process takes its
share of the inputs. Masks are the network's own unless --postprocess applies the checkpoint's
post-processing. With --masks every image is also scored against its labelled mask: per image in
summary.csv, over all in metrics.json.
"""
import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from utils.cli import run_main, warn
from utils.config import load_config
from utils.data.imageio import DataError
from utils.files import folder_problem
from utils.evaluation.scoring import FolderScore, check_mask_sizes, choose_encoding, find_masks
from utils.inference.images import ImageRunner, ReadAhead
from utils.inference.inputs import IO_THREADS, check_outputs_apart, find_inputs, plan_jobs
from utils.inference.inputs import read_image  # noqa: F401  (inference.read_image, as tests call it)
from utils.inference.ranks import merge_rank_confusions, merge_rank_summaries, rank_summary_path, write_rank_results
from utils.inference.segmenter import Segmenter
from utils.inference.slides import run_slide
from utils.inference.summary import (SUMMARY, merge_with_earlier_run, skipped_row, summary_columns, write_score,
                                     write_summary)
from utils.inference.tiles import predict_tile_batch  # noqa: F401  (inference.predict_tile_batch: tests, bench.py)
from utils.runtime import cleanup, setup_runtime
from utils.stage2.predict import load_segmenter


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="stage-2 best.pth or .safetensors")
    parser.add_argument("--input", required=True, help="an image, a slide, or a folder of them")
    parser.add_argument("--output", required=True, help="folder for masks, overlays and summary.csv")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default: 16)")
    parser.add_argument("--window", type=int, help="window size in pixels (default: the checkpoint's)")
    parser.add_argument("--overlap", type=float, help="window overlap in [0, 1) (default: the checkpoint's)")
    parser.add_argument("--save-probs", action="store_true", help="also write an 8-bit probability PNG per class")
    parser.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist")
    parser.add_argument("--recursive", action="store_true", help="also look in subfolders")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--mpp", type=float,
                       help="analyse at this many microns per pixel instead of the model's own (slides, and "
                            "images with --input-mpp)")
    where.add_argument("--level", type=int,
                       help="slides: analyse this OpenSlide level as it is (default: the level nearest the "
                            "model's resolution, at or finer, resized to it)")
    parser.add_argument("--input-mpp", type=float,
                        help="microns per pixel of inputs that do not state their own: plain images, which are "
                             "then resized to the model's resolution for the network (outputs keep their size), "
                             "and slides without an mpp property")
    parser.add_argument("--downsample", type=float, default=8.0,
                        help="slides: level-0 pixels per pixel of the saved mask (default: %(default)s)")
    parser.add_argument("--mask-format", choices=("png", "tiff"), default="png",
                        help="slides: tiff also writes <name>_mask.tif, a tiled pyramidal TIFF of class indices "
                             "with the slide's resolution, which slide viewers overlay (default: png only)")
    parser.add_argument("--no-tta", action="store_true",
                        help="skip the flip test-time augmentation a model trained with stage2.tta_flip uses "
                             "(3x faster, slightly different masks)")
    parser.add_argument("--postprocess", action="store_true",
                        help="apply the post-processing the model's data set defines (e.g. filling glands' "
                             "holes); off by default, so masks are the network's own")
    scoring = parser.add_argument_group("scoring against labelled masks")
    scoring.add_argument("--masks", help="folder of masks named like the inputs: writes metrics.json and "
                                         "per-image scores in summary.csv")
    scoring.add_argument("--mask-suffix", default="", help="mask name ending after the image's stem, e.g. _anno")
    scoring.add_argument("--mask-encoding", default="auto", choices=("auto", "index", "binary255", "instance"),
                         help="how the masks store classes (default: read from their values)")
    scoring.add_argument("--mask-downsample", type=float, default=1.0,
                         help="the masks are this many times smaller than their images (default: 1)")
    return parser


def check_args(parser, args):
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.window is not None and args.window < 8:
        parser.error(f"--window must be at least 8 pixels, got {args.window}.")
    if args.overlap is not None and not 0 <= args.overlap < 1:
        parser.error(f"--overlap must be in [0, 1), got {args.overlap}.")
    if args.mpp is not None and args.mpp <= 0:
        parser.error(f"--mpp must be positive, got {args.mpp}.")
    if args.input_mpp is not None and args.input_mpp <= 0:
        parser.error(f"--input-mpp must be positive, got {args.input_mpp}.")
    if args.downsample < 1:
        parser.error(f"--downsample must be at least 1, got {args.downsample}.")
    if args.mask_downsample < 1:
        parser.error(f"--mask-downsample must be at least 1, got {args.mask_downsample}.")
    if args.masks is None and (args.mask_suffix or args.mask_encoding != "auto" or args.mask_downsample != 1):
        parser.error("--mask-suffix, --mask-encoding and --mask-downsample need --masks.")


def describe_analysis(args, segmenter, jobs):
    """Where slides and images are analysed, and one warning when the model's resolution is needed but unknown."""
    slides, images = any(job.slide for job in jobs), any(not job.slide for job in jobs)
    unknown = segmenter.model_mpp is None and args.mpp is None
    if slides:
        if args.level is not None:
            where = f"level {args.level} as it is"
        elif args.mpp is not None:
            where = f"{args.mpp:g} um/px (--mpp)"
        elif not unknown:
            where = f"the model's {segmenter.model_mpp:g} um/px"
        else:
            where = "level 0 as it is"
        if args.level is None and not unknown:
            where += " (the nearest level at or finer, tiles resized to match)"
        print(f"slides: analysed at {where}; masks and GeoJSON at downsample {args.downsample:g} "
              "(level-0 pixels per mask pixel)")
    if images and args.input_mpp is not None and not unknown:
        print(f"images: {args.input_mpp:g} um/px (--input-mpp) analysed at {segmenter.analysis_mpp:g} um/px; "
              "outputs keep the images' size")
    if unknown and ((slides and args.level is None) or (images and args.input_mpp is not None)):
        warn(f"{args.checkpoint} does not state the microns per pixel of its training images (data.mpp); assumed "
             "they match the inputs, so every input is analysed at its own pixel size (level 0 of slides); "
             "--mpp or --level choose a resolution")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    runtime = setup_runtime(load_config(None, [(f"device={args.device}", f"--device {args.device}")]))
    try:
        return run(args, runtime)
    finally:
        # ranks finish their shares at different times; rank 0 already waits for their summaries by file
        cleanup(runtime, wait_for_all=False)


def run(args, runtime):
    output_dir = Path(args.output)
    problem = folder_problem(output_dir)
    if problem:  # found now, not after every input has been segmented
        raise DataError(f"--output {output_dir} cannot hold the outputs ({problem}); choose another folder.")
    model, meta = load_segmenter(args.checkpoint, runtime.device)
    jobs = plan_jobs(find_inputs(args.input, output_dir, args.recursive), output_dir)
    segmenter = Segmenter(model, meta, runtime, args)
    check_outputs_apart(jobs, segmenter.paths)
    if args.masks:
        masks = find_masks(jobs, args.masks, args.mask_suffix)  # every mask is found before any work starts
        check_mask_sizes(jobs, masks, args.mask_downsample)
        encoding = choose_encoding([masks[job.index] for job in jobs], len(segmenter.classes), args.mask_encoding)
        segmenter.use_masks(FolderScore(segmenter.classes, encoding, postprocessed=bool(segmenter.fill)), masks)
        args.overwrite = True  # every score comes from this run's predictions
        if runtime.is_main:
            print(f"scoring against {args.masks} (mask encoding {encoding}); every input is predicted again")
    if runtime.distributed:
        rank_summary_path(output_dir, runtime.rank).unlink(missing_ok=True)
        runtime.barrier()  # no rank may see another's stale rows from an earlier run
    mine = runtime.shard(jobs)
    if runtime.is_main:
        print(f"{len(jobs)} input(s) -> {output_dir}; window {segmenter.window}, overlap {segmenter.overlap}, "
              f"{'flip test-time augmentation, ' if segmenter.tta else ''}device {runtime.device}"
              + (f", {runtime.world_size} processes" if runtime.distributed else ""))
        if args.postprocess and not segmenter.fill:
            print(f"--postprocess: {args.checkpoint} defines no post-processing (postprocess in its data set's "
                  "YAML); masks are the network's own")
        print("post-processing: " + (segmenter.steps if segmenter.fill else "none (the network's own masks)"))
        describe_analysis(args, segmenter, jobs)

    rows = []
    bar = tqdm(total=len(mine), desc="inference", unit="file", disable=not runtime.is_main)
    todo = [job for job in mine if args.overwrite or not all(p.is_file() for p in segmenter.paths(job).values())]
    waiting = {job.index for job in todo}
    for job in mine:
        if job.index not in waiting:
            rows.append(skipped_row(segmenter, job))
            bar.update(1)
    images = ImageRunner(segmenter)
    ahead = 4 * args.batch_size + IO_THREADS  # images decoded ahead of the device, bounded for memory
    with ReadAhead(segmenter.read, [job for job in todo if not job.slide], ahead) as reading:
        for job in todo:
            finished = [run_slide(segmenter, job, position=1)] if job.slide else images.add(job, reading.take(job))
            rows += finished
            bar.update(len(finished))
    rows += images.flush_all()
    images.finish_writes()
    bar.update(len(mine) - bar.n)
    bar.close()

    columns = summary_columns(segmenter.classes, segmenter.scorer)
    order = {job.name: job.index for job in jobs}
    if runtime.distributed:
        write_rank_results(output_dir, runtime.rank, columns, rows, segmenter.scorer)
        if not runtime.is_main:
            return 1 if any(r["status"].startswith("error") for r in rows) else 0
        rows = merge_rank_summaries(output_dir, runtime.world_size, columns, order)
        if segmenter.scorer is not None:
            merge_rank_confusions(output_dir, runtime.world_size, segmenter.scorer)
    else:
        rows.sort(key=lambda r: order[r["file"]])
    # the folder's record: this run's rows beside the rows of an earlier run's outputs it did not redo
    columns, rows, confusions = merge_with_earlier_run(output_dir, columns, rows, segmenter.scorer, str(args.checkpoint),
                                                      segmenter.classes)
    write_summary(output_dir / SUMMARY, columns, rows)
    if segmenter.scorer is not None or (output_dir / "metrics.json").is_file():
        makers = sorted({row["checkpoint"] for row in rows if row["file"] in confusions and row.get("checkpoint")})
        write_score(output_dir, segmenter.classes, confusions, segmenter.steps,
                    makers[0] if len(makers) == 1 else makers, args.masks,
                    segmenter.scorer.encoding if segmenter.scorer else None)
    this_run = [r for r in rows if r["file"] in order]  # the summary also keeps earlier runs' rows
    failed = [r for r in this_run if r["status"].startswith("error")]
    skipped = sum(r["status"] == "skipped" for r in this_run)
    print(f"{len(this_run) - len(failed) - skipped} done, {skipped} skipped (outputs exist; --overwrite redoes "
          f"them), {len(failed)} failed; see {output_dir / SUMMARY}")
    for row in failed:
        print(f"  {row['file']}: {row['status']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
