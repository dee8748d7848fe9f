"""Dense CRF on class maps (Krähenbühl and Koltun, NIPS 2011), as SEAM, PSA and IRN refine their CAMs: the
labels follow the image's colour edges. Needs the optional package pydensecrf2 (requirements-crf.txt)."""
import numpy as np

# Pairwise terms as PSA and SEAM set them: a 3 px smoothness kernel, and an 80 px, 13-grey-level appearance one.
GAUSSIAN = {"sxy": 3, "compat": 3}
BILATERAL = {"sxy": 80, "srgb": 13, "compat": 10}


def crf_available():
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def dense_crf(image, maps, allowed, iterations):
    """C x H x W class probabilities after `iterations` of mean-field inference, from class maps (C x H x W, >= 0;
    each pixel's maps taken as its class probabilities) of an RGB uint8 image. Classes `allowed` rules out keep
    probability 0; a pixel no class claims starts uniform over the allowed classes."""
    import pydensecrf.densecrf as dcrf
    classes, height, width = maps.shape
    scores = np.where(allowed, maps, 0.0).astype(np.float32)
    unclaimed = scores.sum(axis=0) <= 0
    scores[:, unclaimed] = allowed[:, unclaimed]
    probs = scores / np.maximum(scores.sum(axis=0, keepdims=True), 1e-12)
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-8, 1.0)).reshape(classes, -1)))
    crf.addPairwiseGaussian(**GAUSSIAN)
    crf.addPairwiseBilateral(rgbim=np.ascontiguousarray(image[..., :3]), **BILATERAL)
    return np.array(crf.inference(iterations), np.float32).reshape(classes, height, width)
