"""A slide's class mask as files a slide viewer opens: GeoJSON annotations (QuPath) and a pyramidal TIFF."""
import cv2
import numpy as np

MASK_TIFF_TILE = 256


def _ring(contour, downsample, bounds, tolerance):
    """A closed GeoJSON ring in level-0 pixels, or None when simplification leaves no area."""
    simplified = cv2.approxPolyDP(contour, tolerance, True)
    if len(simplified) < 3 or cv2.contourArea(simplified) <= 0:
        return None
    points = (simplified[:, 0, :].astype(np.float64) + 0.5) * downsample  # mask pixel centres
    points[:, 0] = np.clip(points[:, 0], 0, bounds[0])
    points[:, 1] = np.clip(points[:, 1], 0, bounds[1])
    ring = [[round(float(x), 1), round(float(y), 1)] for x, y in points]
    return ring + [ring[0]]


def mask_to_geojson(mask, classes, palette, downsample, bounds, background=0, tolerance=0.75):
    """FeatureCollection of one Polygon (with holes) per connected region of each non-background class
    (every class when background is None; ignore is never exported).

    Coordinates are level-0 pixels (mask pixel * downsample) clipped to bounds = (width, height); the
    properties follow what QuPath reads as a classified annotation.
    """
    features = []
    for index, name in enumerate(classes):
        if index == background:
            continue
        binary = (mask == index).astype(np.uint8)
        if not binary.any():
            continue
        contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        links = hierarchy[0]  # per contour: next, previous, first child, parent
        properties = {"objectType": "annotation",
                      "classification": {"name": name, "color": [int(c) for c in palette[index]]}}
        for i, contour in enumerate(contours):
            if links[i][3] != -1:
                continue  # a hole: emitted with its outer boundary
            outer = _ring(contour, downsample, bounds, tolerance)
            if outer is None:
                continue
            rings = [outer]
            child = links[i][2]
            while child != -1:
                hole = _ring(contours[child], downsample, bounds, tolerance)
                if hole is not None:
                    rings.append(hole)
                child = links[child][0]
            features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
                             "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def mask_pyramid(mask, tile=MASK_TIFF_TILE):
    """The mask and its halvings, down to one tile. Every other pixel is kept: class indices must not blend."""
    levels = [mask]
    while max(levels[-1].shape) > tile:
        levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))
    return levels


def write_mask_tiff(path, mask, microns_per_pixel=None, tile=MASK_TIFF_TILE):
    """A class mask as a tiled, pyramidal, deflate-compressed TIFF that slide viewers overlay.

    Pixels hold class indices (grayscale, uint8), so OpenSlide and tifffile read back exactly the saved mask;
    levels are successive pages, each half the size of the one before, as in a generic tiled slide. With
    `microns_per_pixel` (of the mask's full level), each level carries its resolution tags.
    """
    import tifffile

    from utils.files import atomic_path
    levels = mask_pyramid(np.ascontiguousarray(mask, dtype=np.uint8), tile)
    bigtiff = sum(level.nbytes for level in levels) > 2 ** 31  # offsets past 4 GiB need BigTIFF
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        for index, level in enumerate(levels):
            options = {}
            if microns_per_pixel is not None:
                per_centimetre = 1e4 / (microns_per_pixel * 2 ** index)  # level k keeps every 2^k-th pixel
                options = {"resolution": (per_centimetre, per_centimetre), "resolutionunit": "CENTIMETER"}
            tif.write(level, tile=(tile, tile), photometric="minisblack", compression="zlib",
                      subfiletype=1 if index else 0, metadata=None, **options)
