"""Pictures a person would rather look at than read: heat-maps and contact sheets."""
import cv2
import numpy as np

from utils.data.imageio import colorize, write_rgb


def heat_overlay(image, heat, alpha=0.5):
    """A [0, 1] heat-map in the JET colour map blended over the image."""
    heat = cv2.resize(np.asarray(heat, dtype=np.float32), (image.shape[1], image.shape[0]))
    colour = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)[..., ::-1]
    return np.uint8(image * (1 - alpha) + colour * alpha)


def _fit(picture, size):
    return cv2.resize(picture, (size, size), interpolation=cv2.INTER_NEAREST)


def contact_sheet(path, rows, titles, cell=160):
    """rows: lists of H x W x 3 uint8 pictures (None for a blank cell); titles label the columns."""
    header = np.full((24, cell * len(titles), 3), 255, np.uint8)
    for column, title in enumerate(titles):
        cv2.putText(header, title, (column * cell + 6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
    lines = [header]
    for row in rows:
        cells = [(_fit(p, cell) if p is not None else np.full((cell, cell, 3), 255, np.uint8)) for p in row]
        lines.append(np.concatenate(cells, axis=1))
    write_rgb(path, np.concatenate(lines, axis=0))


def mask_picture(mask, palette):
    return colorize(mask, palette)
