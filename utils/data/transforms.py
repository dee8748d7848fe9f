"""Image <-> tensor conversion and the augmentations: flips and crops (the method's); scale jitter, right-angle
rotations, stain and colour jitter (optional, for models trained from scratch)."""
import numpy as np
import torch

from utils.data.imageio import IGNORE_INDEX


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


def random_scale_pair(image, mask, rng, jitter):
    """Image and mask resized together by a factor drawn from U(1 - jitter, 1 + jitter): glands at other
    sizes. The mask is resized by nearest neighbour, so it only holds labels it held before."""
    if not jitter:
        return image, mask
    import cv2
    factor = rng.uniform(1 - jitter, 1 + jitter)
    height, width = mask.shape
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return (cv2.resize(image, size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST))


def random_crop_pair(image, mask, size, rng, flip=True, rotate=False):
    """Pad to at least size (image white, mask ignore), crop size x size at random, flip both (and transpose
    both, when `rotate`)."""
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
    if rotate and rng.random() < 0.5:
        image, mask = image.transpose(1, 0, 2), mask.T
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


# Ruifrok & Johnston's optical densities of haematoxylin, eosin and DAB (rows, unit length): the basis in
# which H&E colour varies between labs and scanners.
STAIN_BASIS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])
STAIN_BASIS = STAIN_BASIS / np.linalg.norm(STAIN_BASIS, axis=1, keepdims=True)
RGB_FROM_STAIN_INVERSE = np.linalg.inv(STAIN_BASIS)


def stain_jitter(image, rng, hed=0.0, colour=0.0):
    """An H&E image with its stains and colours jittered (H x W x 3 uint8 in, same out).

    hed: each stain's concentration c becomes c * U(1 - hed, 1 + hed) + U(-hed, hed) * 0.1 (optical
    density), in the haematoxylin-eosin-DAB basis; colour: brightness, contrast and saturation factors drawn
    from U(1 - colour, 1 + colour). Only colours change, never positions, so a mask stays aligned.
    """
    if not hed and not colour:
        return image
    pixels = image.astype(np.float32)
    if hed:
        density = -np.log10(np.maximum(pixels, 1.0) / 255.0)
        stains = density.reshape(-1, 3) @ RGB_FROM_STAIN_INVERSE.astype(np.float32)
        scale = rng.uniform(1 - hed, 1 + hed, 3).astype(np.float32)
        shift = rng.uniform(-hed, hed, 3).astype(np.float32) * 0.1
        density = (stains * scale + shift) @ STAIN_BASIS.astype(np.float32)
        pixels = 255.0 * np.power(10.0, -density).reshape(image.shape)
    if colour:
        brightness, contrast, saturation = rng.uniform(1 - colour, 1 + colour, 3)
        pixels = pixels * brightness
        pixels = (pixels - pixels.mean()) * contrast + pixels.mean()
        grey = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        pixels = (pixels - grey[..., None]) * saturation + grey[..., None]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
