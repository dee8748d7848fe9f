"""Batched tile prediction: many small images in one forward pass, with the result of predicting each alone."""
import numpy as np
import torch
import torch.nn.functional as F

from utils.data.transforms import normalize_batch


@torch.no_grad()
def predict_tile_batch(model, tiles, runtime, window, mean, std, batch_size):
    """Logits (N x C x h x w, float32) for N same-size h x w x 3 uint8 tiles no larger than the window.

    Tiles are padded to the window as sliding-window prediction pads one small image, so batching them
    changes the speed, not the result.
    """
    count = len(tiles)
    batch = torch.from_numpy(np.stack(tiles))
    if runtime.device.type == "cuda" and count < batch_size:
        # one batch shape: no new cuDNN tuning for a short last batch, and the forward pass stays on its graph
        batch = torch.cat([batch, batch[-1:].expand(batch_size - count, -1, -1, -1)])
    batch = normalize_batch(batch.to(runtime.device, non_blocking=True), mean, std)
    height, width = batch.shape[-2:]
    pad_bottom, pad_right = window - height, window - width
    if pad_bottom or pad_right:
        mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"
        batch = F.pad(batch, (0, pad_right, 0, pad_bottom), mode=mode)
    with runtime.autocast():
        logits = model(batch.contiguous(memory_format=torch.channels_last)).float()
    return logits[:count, :, :height, :width]


def to_size(logits, size):
    """N x C x h x w logits brought to size (H, W): network resolution back to the image's own."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
