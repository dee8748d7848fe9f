"""Class maps as the stage-1 classifier was trained to give them: tiles resized to the training input, the
multi-layer CAMs normalised, masked by the labels and refined, and whole images voted over tiles of the
training size."""
import numpy as np
import torch

from utils.data.transforms import to_tensor
from utils.stage1.cam import multi_layer_cam, normalise_cams, refine_cams, scaled_size
from utils.stage1.stitch import label_union, mean_tile_votes, patch_votes, tile_boxes


def network_input(image, size_or_scale, mean, std, multiple=1):
    """Resize an RGB array for the classifier (square size for tiles, scale factor for whole images, whose
    sides are then rounded to a multiple of a ViT's patch size)."""
    import cv2
    if isinstance(size_or_scale, int):
        size = (size_or_scale, size_or_scale)
    else:
        height, width = scaled_size(image.shape[0], image.shape[1], size_or_scale, multiple)
        size = (width, height)
    if size != (image.shape[1], image.shape[0]):
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return to_tensor(image, mean, std)


def class_maps(model, images, out_size, labels, s1, runtime):
    """The class maps that decide a pseudo-mask: multi-layer CAMs (over the configured scales and flips) at
    out_size, each class scaled to [0, 1] (then averaged over the members of a ClassifierEnsemble) and kept
    only where the label has it, then refined along colour edges when stage1.cam_refine_iterations asks.
    labels None: predicted from the image (threshold).
    Returns (maps N x C x H x W, labels N x C)."""
    members = list(getattr(model, "members", None) or [model])  # a ClassifierEnsemble, or one classifier
    maps, probabilities = 0.0, 0.0
    for member in members:
        with runtime.autocast():
            cams, member_probabilities = multi_layer_cam(member, images, out_size, s1.cam_weights, s1.cam_scales,
                                                         s1.cam_flip)
        maps, probabilities = maps + normalise_cams(cams), probabilities + member_probabilities
    maps, probabilities = maps / len(members), probabilities / len(members)
    if labels is None:
        labels = (probabilities > s1.label_threshold).float()
    maps = maps * labels.to(maps.device, torch.float32)[:, :, None, None]
    maps = refine_cams(maps, images, s1.cam_refine_iterations, s1.cam_refine_dilations, s1.cam_refine_colour_scale)
    return maps, labels


@torch.no_grad()
def whole_image_votes(cfg, model, image, tile, runtime, with_allowed=False):
    """C x H x W class votes of a whole image, made the way the training images' are: the image is cut into
    half-overlapping tiles of the training tile size (`tile` = (h, w) px), each seen at stage1.image_size
    with the labels the classifier predicts for that tile, and the tiles' votes are averaged where they
    overlap. The classifier thus sees what it was trained on, whatever the image's size. with_allowed: also the
    classes the tiles' predicted labels allow at each pixel (label_union)."""
    s1 = cfg.stage1
    height, width = image.shape[:2]
    boxes = tile_boxes(height, width, tile)
    scale = s1.image_size / max(tile)
    multiple = getattr(model, "size_multiple", 1)
    votes, predicted = [], []
    for start in range(0, len(boxes), s1.cam_batch_size):
        batch = boxes[start:start + s1.cam_batch_size]
        tensor = torch.stack([network_input(image[y:y + h, x:x + w], scale, cfg.data.mean, cfg.data.std, multiple)
                              for y, x, h, w in batch]).to(runtime.device)
        maps, labels = class_maps(model, tensor, batch[0][2:], None, s1, runtime)
        votes.append(patch_votes(maps, labels.to(maps.device)).cpu().numpy())
        predicted.append(labels.cpu().numpy())
    mean = mean_tile_votes(np.concatenate(votes), boxes, height, width)
    return (mean, label_union(np.concatenate(predicted), boxes, height, width)) if with_allowed else mean
