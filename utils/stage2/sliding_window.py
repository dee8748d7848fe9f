"""Whole-image logits from a window-sized predictor: overlapping windows blended with a Gaussian weight."""
import torch
import torch.nn.functional as F


def window_positions(size, window, stride):
    """Start offsets of windows covering 0..size-1; the last window ends exactly at the border."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def window_weight(window, device):
    """Separable Gaussian (sigma = window / 8), so a window's uncertain edges count little at the seams."""
    sigma = window / 8.0
    coords = torch.arange(window, device=device, dtype=torch.float32) - (window - 1) / 2.0
    profile = torch.exp(-coords.pow(2) / (2.0 * sigma * sigma))
    # Keep edge weights well above zero so pixels covered only by window edges are still well defined.
    profile = profile.clamp(min=1e-3)
    return profile[:, None] * profile[None, :]


def _pad_to_window(image, window):
    height, width = image.shape[-2:]
    pad_bottom, pad_right = max(0, window - height), max(0, window - width)
    if pad_bottom == 0 and pad_right == 0:
        return image
    # Reflection only works while the padding is smaller than the image; tiny images repeat their edge.
    mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"
    return F.pad(image, (0, pad_right, 0, pad_bottom), mode=mode)


@torch.no_grad()
def sliding_window_logits(predict, image, num_classes, window, overlap, batch_size=8):
    """1 x C x H x W logits for a 1 x 3 x H x W (or 3 x H x W) image.

    predict maps an N x 3 x window x window batch to N x C x window x window logits. Windows step by
    round(window * (1 - overlap)); images smaller than the window are padded and the result cropped back.
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"sliding-window prediction takes one image (3 x H x W or 1 x 3 x H x W), "
                         f"got shape {tuple(image.shape)}.")
    if window < 1 or not 0 <= overlap < 1:
        raise ValueError(f"sliding window needs window >= 1 and 0 <= overlap < 1, got {window} and {overlap}.")
    height, width = image.shape[-2:]
    padded = _pad_to_window(image, window)
    stride = max(1, int(round(window * (1 - overlap))))
    corners = [(top, left) for top in window_positions(padded.shape[-2], window, stride)
               for left in window_positions(padded.shape[-1], window, stride)]

    weight = window_weight(window, image.device)
    logit_sum = torch.zeros((num_classes,) + padded.shape[-2:], device=image.device, dtype=torch.float32)
    weight_sum = torch.zeros(padded.shape[-2:], device=image.device, dtype=torch.float32)
    for first in range(0, len(corners), batch_size):
        chunk = corners[first:first + batch_size]
        crops = torch.cat([padded[..., t:t + window, l:l + window] for t, l in chunk], dim=0)
        logits = predict(crops)
        if not isinstance(logits, torch.Tensor):
            raise ValueError("the predictor must return one logits tensor; put the model in eval mode.")
        expected = (len(chunk), num_classes, window, window)
        if tuple(logits.shape) != expected:
            raise ValueError(f"the predictor returned logits of shape {tuple(logits.shape)} for windows of "
                             f"{window} px; expected {expected} (check num_classes).")
        for (top, left), window_logits in zip(chunk, logits.float()):
            logit_sum[:, top:top + window, left:left + window] += window_logits * weight
            weight_sum[top:top + window, left:left + window] += weight
    return (logit_sum / weight_sum)[:, :height, :width].unsqueeze(0)


def count_windows(height, width, window, overlap):
    """How many windows sliding_window_logits runs for an image of this size (for progress bars)."""
    stride = max(1, int(round(window * (1 - overlap))))
    rows = len(window_positions(max(height, window), window, stride))
    cols = len(window_positions(max(width, window), window, stride))
    return rows * cols
