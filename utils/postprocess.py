"""Optional clean-up of class masks that encodes what a tissue looks like, set per data set in the YAML."""
import numpy as np

from utils.imageio import IGNORE_INDEX


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


def class_indices(classes, names):
    return [list(classes).index(name) for name in names]
