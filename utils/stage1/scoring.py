"""Stage 1's CAMs scored on whole val and test images, each voted over tiles as the classifier was trained."""
import numpy as np
import torch
from tqdm import tqdm

from utils.config import background_index
from utils.data.datasets import load_pair
from utils.evaluation.metrics import confusion_matrix
from utils.evaluation.postprocess import class_indices, fill_holes
from utils.stage1.class_maps import whole_image_votes
from utils.stage1.stitch import vote_mask, weigh_background


@torch.no_grad()
def score_whole_images(cfg, model, split_list, runtime, tile, refiner=None):
    """CAM masks of whole val/test images from their tiles' votes (whole_image_votes), scored on every
    labelled pixel: a pixel no class claims is background, or a miss where there is no background class.

    Returns the confusion matrices (C x (C + 1)) without and with post-processing (None when none is set), and
    the same two for the masks after `refiner`'s steps (None without one), each image's classes kept to those
    its tiles' predicted labels allow.
    """
    s1, classes = cfg.stage1, cfg.data.classes
    num_classes, background = len(classes), background_index(classes, cfg.data.background)
    fill = class_indices(classes, cfg.postprocess.fill_holes)
    confusion = np.zeros((4, num_classes, num_classes + 1), dtype=np.int64)
    scale = s1.image_size / max(tile)
    model.eval()
    for item in tqdm(runtime.shard(split_list), desc="scoring CAMs", disable=not runtime.is_main, leave=False):
        image, truth = load_pair(item, cfg.data.mask_encoding, num_classes)
        votes, allowed = whole_image_votes(cfg, model, image, tile, runtime, with_allowed=True)
        masks = [vote_mask(weigh_background(votes.copy(), background, s1.background_cam_scale), background)]
        if refiner is not None:  # unclaimed pixels are background, or misses without one
            masks.append(refiner.mask(image, votes, allowed, scale))
        for index, mask in enumerate(masks):
            confusion[2 * index] += confusion_matrix(mask, truth, num_classes, count_unclaimed=True)
            if fill:
                confusion[2 * index + 1] += confusion_matrix(fill_holes(mask, fill), truth, num_classes,
                                                             count_unclaimed=True)
    confusion = runtime.all_reduce_sum(torch.from_numpy(confusion).to(runtime.device)).cpu().numpy()
    cleaned = [confusion[i] if fill else None for i in (1, 3)]
    if refiner is None:
        return confusion[0], cleaned[0], None, None
    return confusion[0], cleaned[0], confusion[2], cleaned[1]
