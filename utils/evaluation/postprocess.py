"""Optional clean-up of predicted class masks, set per data set in the YAML (`postprocess`).

Post-processing encodes what a tissue looks like rather than what the network learned, so every figure
is reported without it first and with it beside; `describe` names the steps for those tables.
"""
import numpy as np

from utils.data.imageio import IGNORE_INDEX


def fill_holes(mask, class_indices):
    """Pixels enclosed by a class become that class (a gland encloses its lumen); ignore stays ignore."""
    if not class_indices:
        return mask
    from scipy.ndimage import binary_fill_holes
    filled = np.array(mask, copy=True)
    for index in class_indices:
        region = mask == index
        if region.any():
            enclosed = binary_fill_holes(region) & ~region & (mask != IGNORE_INDEX)
            filled[enclosed] = index
    return filled


def fill_holes_with_probabilities(mask, probabilities, class_indices):
    """fill_holes, and the probabilities (C x H x W) of the pixels it changed made certain of their new
    class, so that saved probability maps agree with the saved mask."""
    filled = fill_holes(mask, class_indices)
    changed = filled != mask
    if changed.any():
        probabilities[:, changed] = 0.0
        probabilities[filled[changed], np.nonzero(changed)[0], np.nonzero(changed)[1]] = 1.0
    return filled, probabilities


def class_indices(classes, names):
    return [list(classes).index(name) for name in names]


def describe(classes, fill_indices):
    """The post-processing steps in words, e.g. 'fill holes: gland'; '' when there are none."""
    if not fill_indices:
        return ""
    return "fill holes: " + ", ".join(classes[i] for i in fill_indices)
