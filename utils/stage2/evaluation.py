"""A segmenter scored on whole val and test images at their own resolution, its predictions and overlays
saved, and the picture of a few of them."""
import numpy as np
import torch
from tqdm import tqdm

from utils.config import background_index
from utils.data.datasets import load_pair
from utils.data.imageio import colorize, overlay, read_mask, write_palette_png, write_rgb
from utils.evaluation.metrics import confusion_matrix
from utils.evaluation.postprocess import class_indices, fill_holes
from utils.files import BackgroundWriter
from utils.stage2.predict import FlipAveraged, predict_mask
from utils.training import TrainingError, out_of_memory_message
from utils.visualize import contact_sheet


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
