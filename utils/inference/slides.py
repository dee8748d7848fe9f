"""One whole-slide image: read at the analysis resolution, its tissue tiles predicted in batches, its outputs
written, its summary row returned."""
import time

import torch
from tqdm import tqdm

from utils.cli import warn
from utils.data.imageio import DataError
from utils.evaluation.postprocess import fill_holes_with_probabilities
from utils.inference.inputs import IO_THREADS
from utils.inference.outputs import write_slide_outputs
from utils.inference.summary import class_fractions, error_row, summary_row
from utils.inference.tiles import predict_tile_batch
from utils.slides.slide import Slide, choose_resolution, describe_resolution, segment_slide


def run_slide(segmenter, job, position):
    seg, args = segmenter, segmenter.args
    start = time.perf_counter()
    try:
        with Slide(job.path, fallback_mpp=args.input_mpp) as slide:
            resolution = choose_resolution(slide, args.mpp, args.level, seg.model_mpp)
            if slide.mpp is None and args.level is None and seg.model_mpp is not None:
                warn(f"{job.path} does not state its microns per pixel; assumed it was scanned at the "
                     f"model's {seg.model_mpp:g} um/px and analysed level 0 as it is (--input-mpp states "
                     "the scan's resolution, --level picks a level)")
            slide_mpp = slide.mpp
            analysis_mpp = None if slide.mpp is None else slide.mpp * resolution.downsample
            where = describe_resolution(slide, resolution)
            bar = tqdm(desc=f"  {job.path.name}, {where}", unit="tile", leave=False, position=position,
                       disable=not seg.runtime.is_main)

            def progress(done, total):
                bar.total = total
                bar.n = done
                bar.refresh()

            def predict(images):
                return predict_tile_batch(seg.forward, list(images), seg.runtime, seg.window, seg.mean, seg.std,
                                          args.batch_size)

            try:
                result = segment_slide(slide, predict, len(seg.classes), seg.window, seg.overlap, args.batch_size,
                                       resolution, args.downsample, progress, workers=IO_THREADS,
                                       background=seg.background)
            finally:
                bar.close()
            dimensions = slide.dimensions
            # saved probabilities must agree with the saved mask, also where post-processing changed it
            result.mask, result.probabilities = fill_holes_with_probabilities(result.mask, result.probabilities,
                                                                              seg.fill)
    except (DataError, OSError, MemoryError) as error:
        return error_row(seg.classes, job, "slide", error)
    except torch.OutOfMemoryError:
        return error_row(seg.classes, job, "slide", f"{job.path}: out of memory on {seg.runtime.device}; "
                         "lower --batch-size.")
    try:
        write_slide_outputs(seg, seg.paths(job), result, dimensions, slide_mpp)
    except OSError as error:
        return error_row(seg.classes, job, "slide", f"writing outputs for {job.path} failed ({error}).")
    return summary_row(seg.classes, job, "slide", "ok", dimensions[0], dimensions[1], time.perf_counter() - start,
                       class_fractions(result.mask, len(seg.classes)), f"{result.mask_downsample:g}",
                       (result.tiles_predicted, result.tiles_total), analysis_mpp)
