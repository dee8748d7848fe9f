"""Multi-layer class activation maps and the pseudo-mask rules, for whole batches on the device."""
import torch
import torch.nn.functional as F

from utils.data.imageio import IGNORE_INDEX


def scaled_size(height, width, scale, multiple=1):
    """(height, width) of an image seen at `scale`; multiples of `multiple` (a ViT's patch size) when above 1."""
    if multiple == 1:
        return max(8, round(height * scale)), max(8, round(width * scale))
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


@torch.no_grad()
def multi_layer_cam(model, images, out_size, cam_weights=(1.0, 1.0, 1.0), scales=(1.0,), flip=False):
    """Weighted sum of the three heads' CAMs at `out_size`, over scales (and horizontal flips).

    images: N x 3 x h x w at the network's input size. Returns (cams N x C x H x W float32,
    image probabilities N x C from the deepest head, averaged over the views).
    """
    total, probabilities, views = None, 0.0, 0
    height, width = images.shape[-2:]
    multiple = getattr(model, "size_multiple", 1)
    for scale in scales:
        scaled = images if scale == 1.0 else F.interpolate(
            images, size=scaled_size(height, width, scale, multiple), mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            view = scaled.flip(-1) if flipped else scaled
            maps, scores = model.cams(view)
            summed = 0.0
            for weight, cam in zip(cam_weights, maps):
                if weight:
                    cam = F.interpolate(cam.float(), size=out_size, mode="bilinear", align_corners=False)
                    summed = summed + weight * cam
            if flipped:
                summed = summed.flip(-1)
            total = summed if total is None else total + summed
            probabilities = probabilities + torch.sigmoid(scores[-1].float())
            views += 1
    return total / views, probabilities / views


def normalise_cams(cams, eps=1e-5):
    """Scale each class map to [0, 1] by its maximum; a flat (all-zero) map stays zero, never NaN."""
    peak = cams.flatten(2).amax(dim=2).clamp_min(eps)
    return cams / peak[:, :, None, None]


def cams_to_masks(cams, labels, background_index=0, background_scale=1.0):
    """Pseudo-masks (N x H x W uint8) from CAMs and image-level labels (N x C, 0/1).

    Rules: classes absent from the label never win; a tile with a single present class is that class
    everywhere; a pixel where no present class activates becomes background when background is in the
    label, otherwise ignore (255) -- never silently a foreground class. background_index None: the data
    set has no background class, and such pixels are always ignore. background_scale weighs the
    normalised background map before the classes are compared (below 1: foreground favoured).
    """
    labels = labels.to(cams.device, torch.float32)
    scores = normalise_cams(cams.float()) * labels[:, :, None, None]
    if background_index is not None and background_scale != 1.0:
        scores[:, background_index] *= background_scale
    best_score, masks = scores.max(dim=1)
    masks = masks.to(torch.uint8)
    unactivated = best_score <= 0
    if background_index is None:
        fallback = torch.full_like(labels[:, 0], IGNORE_INDEX, dtype=torch.uint8)
    else:
        has_background = labels[:, background_index] > 0
        fallback = torch.where(has_background, background_index, IGNORE_INDEX).to(torch.uint8)
    masks = torch.where(unactivated, fallback[:, None, None], masks)
    single = labels.sum(dim=1) == 1
    if single.any():
        only_class = labels.argmax(dim=1).to(torch.uint8)
        masks[single] = only_class[single][:, None, None].expand(-1, *masks.shape[1:])
    empty = labels.sum(dim=1) == 0
    if empty.any():
        masks[empty] = IGNORE_INDEX
    return masks


def heatmap_of(cams, labels, background_index=0):
    """One foreground heat-map per image in [0, 1]: the max over present non-background classes."""
    scores = normalise_cams(cams.float()) * labels.to(cams.device, torch.float32)[:, :, None, None]
    keep = [c for c in range(scores.shape[1]) if c != background_index]
    return scores[:, keep].amax(dim=1)


def claim_unclaimed(masks, background_index):
    """Masks for scoring whole images, where every labelled pixel counts: a pixel no class claimed (ignore)
    is predicted as background; without a background class it stays unclaimed and is scored as a miss."""
    if background_index is None:
        return masks
    return torch.where(masks == IGNORE_INDEX, torch.full_like(masks, background_index), masks)


def neighbour_offsets(dilations):
    """(dy, dx) of the 8 neighbours at each dilation, and the pixel itself."""
    offsets = [(0, 0)]
    for d in dilations:
        offsets += [(dy * d, dx * d) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    return offsets


def _views(tensor, offsets, pad):
    """The tensor seen from each offset (borders replicated): a list of K views of one padded copy."""
    height, width = tensor.shape[-2:]
    padded = F.pad(tensor, (pad, pad, pad, pad), mode="replicate")
    return [padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width] for dy, dx in offsets]


@torch.no_grad()
def refine_cams(cams, images, iterations=10, dilations=(1, 2, 4, 8), colour_scale=0.3):
    """Training-free refinement that lets class maps spread along colour, not across colour edges.

    Each pixel's affinity to its neighbours (8 directions at each dilation, and itself) is a softmax over
    -(colour difference / (colour_scale * local colour spread))^2; the maps are then averaged over those
    affinities `iterations` times (pixel-adaptive refinement, after Ru et al., CVPR 2022). A map that is zero
    on a whole image stays zero, so a class absent from a tile's label is never brought into it.

    cams: N x C x H x W (>= 0); images: N x 3 x h x w in any normalisation, resized here to H x W.
    """
    if iterations <= 0:
        return cams
    height, width = cams.shape[-2:]
    # plain NCHW: on channels_last tensors (the classifier's layout) the shifted views are 1.5x slower
    images = F.interpolate(images.float(), size=(height, width), mode="bilinear", align_corners=False).contiguous()
    offsets = neighbour_offsets(dilations)
    pad = max(dilations)
    # the neighbours' colour spread and differences, one view at a time: a stacked N x 3 x K x H x W copy
    # and its std over K cost twice as long
    views = _views(images, offsets, pad)
    mean = sum(views) / len(views)
    variance = sum((view - mean).square() for view in views) / (len(views) - 1)
    spread = variance.sqrt().mean(dim=1, keepdim=True) + 1e-4                                 # N x 1 x H x W
    difference = torch.stack([(view - images).abs().mean(dim=1) for view in views], dim=1)  # N x K x H x W
    del views, mean, variance
    affinity = torch.softmax(-(difference / (colour_scale * spread)) ** 2, dim=1)
    weights = [affinity[:, k:k + 1] for k in range(len(offsets))]
    refined = cams.float().contiguous()
    for _ in range(iterations):
        total = torch.zeros_like(refined)
        for view, weight in zip(_views(refined, offsets, pad), weights):
            total.addcmul_(view, weight)
        refined = total
    return refined
