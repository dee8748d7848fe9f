"""The stage-2 model with the settings inference runs it at: the checkpoint's own, overridden by the flags."""
import numpy as np
import torch

from utils.cuda_graphs import GraphedForward
from utils.evaluation.postprocess import describe, fill_holes, fill_holes_with_probabilities
from utils.inference.inputs import image_zoom, read_image, zoomed
from utils.inference.outputs import output_paths
from utils.inference.summary import class_fractions
from utils.stage2.predict import FlipAveraged


class Segmenter:
    """The model, its classes, colours, window and resolution, the post-processing asked for, and the scorer."""

    def __init__(self, model, meta, runtime, args):
        # flip test-time augmentation when the model was chosen with it (stage2.tta_flip), unless --no-tta
        self.tta = bool(meta.get("tta_flip")) and not args.no_tta
        model = FlipAveraged(model) if self.tta else model
        self.model, self.runtime, self.args = model, runtime, args
        self.forward = GraphedForward(model, runtime)  # tile batches keep one shape: replayed on CUDA GPUs
        self.classes = list(meta["classes"])
        self.palette = [tuple(int(v) for v in c) for c in meta["palette"]]
        self.mean, self.std = list(meta["mean"]), list(meta["std"])
        self.window = int(args.window or meta["window"])
        self.overlap = float(meta["overlap"] if args.overlap is None else args.overlap)
        self.model_mpp = meta.get("mpp")  # files from before the setting: unknown
        # the resolution the network sees: --mpp, else the model's own (None: inputs' own pixels)
        self.analysis_mpp = args.mpp if args.mpp is not None else self.model_mpp
        self.zoom = image_zoom(args.input_mpp, self.analysis_mpp)  # plain images: network px per image px
        self.background = meta.get("background", 0)  # files from before the setting: class 0
        # classes whose enclosed holes are filled, only when asked: the main output is the network's own
        self.fill = list(meta.get("fill_holes", [])) if args.postprocess else []
        self.steps = describe(self.classes, self.fill)
        self.scorer, self.masks = None, {}  # set by use_masks

    def use_masks(self, scorer, masks):
        """Score every image against its mask (job index -> path) as it is predicted."""
        self.scorer, self.masks = scorer, masks

    def paths(self, job):
        return output_paths(job, self.classes, self.args.save_probs, self.args.mask_format == "tiff")

    def read(self, path):
        """(image, network input): the input is the image resized to the analysis resolution (--input-mpp).
        Runs on a reader thread."""
        image = read_image(path)
        return image, zoomed(image, self.zoom)

    def image_mpp(self):
        """Microns per pixel the network sees in plain images, when known."""
        return None if self.args.input_mpp is None else self.args.input_mpp / self.zoom

    def decide(self, logits):
        """Class masks (argmax on the device, uint8 to the host) after any post-processing, the masks before it,
        their class fractions and, with --save-probs, probabilities that agree with the masks."""
        predicted = logits.argmax(dim=1)
        num_classes = len(self.classes)
        raw = predicted.to(torch.uint8).cpu().numpy()
        probs = list(torch.softmax(logits, dim=1).cpu().numpy()) if self.args.save_probs else None
        if self.fill:
            if probs is None:
                masks = [fill_holes(m, self.fill) for m in raw]
            else:
                masks, probs = map(list, zip(*[fill_holes_with_probabilities(m, p, self.fill)
                                               for m, p in zip(raw, probs)]))
            fractions = [class_fractions(m, num_classes) for m in masks]
        else:  # pixels per class counted on the device, in one pass for the whole batch
            offsets = torch.arange(len(predicted), device=predicted.device).view(-1, 1, 1) * num_classes
            counts = torch.bincount((predicted + offsets).flatten(), minlength=len(predicted) * num_classes)
            masks = raw
            counts = counts.view(-1, num_classes).cpu().numpy()
            fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        return masks, raw, fractions, probs
