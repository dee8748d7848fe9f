"""Image <-> tensor conversion and the few augmentations the method uses (flips, crops)."""
import numpy as np
import torch

from utils.imageio import IGNORE_INDEX


def to_tensor(image, mean, std):
    """H x W x 3 uint8 -> 3 x H x W float, normalised."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean).div_(std)


def normalize_batch(batch_uint8, mean, std):
    """N x H x W x 3 uint8 tensor (any device) -> N x 3 x H x W float, normalised on that device."""
    batch = batch_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=batch.device).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std)


def random_crop_pair(image, mask, size, rng, flip=True):
    """Pad to at least size (image white, mask ignore), crop size x size at random, flip both."""
    height, width = mask.shape
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=255)
        mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
        height, width = mask.shape
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    image = image[top:top + size, left:left + size]
    mask = mask[top:top + size, left:left + size]
    if flip and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if flip and rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)
