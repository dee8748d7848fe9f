"""What the refinement attention's channel gate does to a trained segmenter's masks of scored images.

The channel gate multiplies each class's logits by its own factor, computed from the mean logits of the
window it sees. Two consequences are measured by swapping the trained gate's output for another one:
- "equal class gates": every class gets the window's mean factor. Unequal factors turn the logits' common
  mode into a bias between classes; with equal ones the class chosen is the ungated logits' argmax (the
  spatial gate is one positive factor per pixel and changes no argmax within a window).
- "one gate for every window": every window gets the mean gate over all windows of all images, so the
  gate no longer changes from one inference window to the next.
Each swap is scored against the true masks and counted in pixels whose class changes.
"""
import numpy as np
import torch
from tqdm import tqdm

from utils.data.datasets import load_pair
from utils.evaluation.metrics import confusion_matrix, scores
from utils.stage2.predict import FlipAveraged, predict_mask

SWAPS = ("equal class gates", "one gate for every window")


def _equal_class_gates(module, inputs, output):
    return output.mean(dim=1, keepdim=True).expand_as(output)


@torch.no_grad()
def gate_effects(model, meta, items, encoding, runtime):
    """{"as trained", *SWAPS}: mIoU and (for the swaps) the fraction of pixels whose class changes, plus the
    trained channel gate per class over the windows it saw ("gates": mean, std, min, max; "class_gap": the
    mean and largest gap between a window's class factors). `model` and `meta` as load_segmenter gives them."""
    attention = getattr(model, "refine", None)
    if not hasattr(attention, "channel_gate"):
        raise ValueError("this segmenter has no refinement attention (stage2.refinement_attention false), so "
                         "it has no gate to measure.")
    num_classes = len(meta["classes"])
    net = FlipAveraged(model) if meta.get("tta_flip") else model
    model.eval()
    seen, trained_masks, results = [], {}, {}

    def record(module, inputs, output):
        seen.append(output.detach().float().flatten(1).cpu())

    def one_gate(module, inputs, output):
        return mean_gate.to(output).view(1, -1, 1, 1).expand_as(output)

    mean_gate = None
    for name, hook in (("as trained", record), (SWAPS[0], _equal_class_gates), (SWAPS[1], one_gate)):
        handle = attention.channel_gate.register_forward_hook(hook)
        confusion, changed, total = np.zeros((num_classes, num_classes), dtype=np.int64), 0, 0
        try:
            for item in tqdm(items, desc=f"val, {name}", leave=False):
                image, truth = load_pair(item, encoding, num_classes)
                mask = predict_mask(net, image, runtime, meta["window"], meta["overlap"], 8, meta["mean"],
                                    meta["std"], num_classes)
                confusion += confusion_matrix(mask, truth, num_classes)
                if name == "as trained":
                    trained_masks[item.stem] = mask
                else:
                    changed += int((mask != trained_masks[item.stem]).sum())
                total += mask.size
        finally:
            handle.remove()
        results[name] = {"miou": scores(confusion)["miou"]}
        if name == "as trained":
            gates = torch.cat(seen)
            mean_gate = gates.mean(dim=0)
            gap = gates.amax(dim=1) - gates.amin(dim=1)
            results["gates"] = {"windows": int(gates.shape[0]), "mean": mean_gate.tolist(),
                                "std": gates.std(0).tolist() if gates.shape[0] > 1 else [0.0] * num_classes,
                                "min": gates.amin(0).tolist(), "max": gates.amax(0).tolist()}
            results["class_gap"] = {"mean": float(gap.mean()), "max": float(gap.max())}
        else:
            results[name]["changed_pixels"] = changed / total
    return results


def describe_gate_effects(results, classes):
    """Lines for the console: the gates, then the mIoU and changed pixels of each swap."""
    gates = results["gates"]
    lines = [f"channel gate over {gates['windows']} window passes: " + ", ".join(
        f"{cls} {mean:.3f} (sd {sd:.3f}, {low:.3f} to {high:.3f})"
        for cls, mean, sd, low, high in zip(classes, gates["mean"], gates["std"], gates["min"], gates["max"]))
        + f"; gap between classes: mean {results['class_gap']['mean']:.3f}, largest {results['class_gap']['max']:.3f}",
        f"as trained: mIoU {results['as trained']['miou']:.4f}"]
    lines += [f"{name}: mIoU {results[name]['miou']:.4f}, {100 * results[name]['changed_pixels']:.2f}% of pixels "
              "change class" for name in SWAPS]
    return lines
