"""The optional steps between class maps and pseudo-masks, the same for the training images and for the whole
val and test images that score them: affinity propagation (stage1.affinity), the background weight, and a dense
CRF (stage1.crf_iterations); then each pixel takes its best class."""
from utils.config import ConfigError, background_index
from utils.stage1.crf import crf_available, dense_crf
from utils.stage1.stitch import vote_mask, weigh_background


def refinement_steps(s1):
    """The names of the refinement steps a config turns on, in order ([] when none)."""
    return (["affinity propagation"] if s1.affinity else []) + (["dense CRF"] if s1.crf_iterations else [])


def check_refinement(s1):
    """Before any work: the refinement steps act on whole training images, and the CRF needs its package."""
    steps = refinement_steps(s1)
    if steps and not s1.stitch_whole_images:
        raise ConfigError(f"{' and '.join(steps)} refine the whole training images stitched from their patches; set "
                          "stage1.stitch_whole_images: true (patches named <image>_<y>_<x>[labels], as "
                          "0_prepare_data.py cuts them), or turn stage1.affinity and stage1.crf_iterations off.")
    if s1.crf_iterations and not crf_available():
        raise ConfigError("stage1.crf_iterations needs the pydensecrf2 package, which is not installed: "
                          "`pip install -r requirements-crf.txt`, or set stage1.crf_iterations: 0.")


def label_refiner(cfg, classifier, runtime):
    """The LabelRefiner a config asks for, None when it asks for no step."""
    if not refinement_steps(cfg.stage1):
        return None
    from utils.stage1.affinity import AffinityPropagation
    return LabelRefiner(cfg, AffinityPropagation(cfg, classifier, runtime) if cfg.stage1.affinity else None)


class LabelRefiner:
    """`mask(image, maps, allowed, scale)`: the pseudo-mask of one image from its class maps (C x H x W in [0, 1]),
    with the classes `allowed` (C x H x W bool) lets in; `scale` is the factor at which the classifier saw it."""

    def __init__(self, cfg, propagation=None):
        self.cfg, self.propagation = cfg, propagation
        self.background = background_index(cfg.data.classes, cfg.data.background)
        self.steps = refinement_steps(cfg.stage1)

    def maps(self, image, maps, allowed, scale):
        s1 = self.cfg.stage1
        if self.propagation is not None:
            maps = self.propagation.refine(image, maps, allowed, scale)
        maps = weigh_background(maps.copy(), self.background, s1.background_cam_scale)
        if s1.crf_iterations:
            maps = dense_crf(image, maps, allowed, s1.crf_iterations)
        return maps

    def mask(self, image, maps, allowed, scale):
        return vote_mask(self.maps(image, maps, allowed, scale), self.background)
