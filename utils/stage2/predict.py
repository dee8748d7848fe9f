"""Segmenting whole images with a stage-2 model: sliding windows on the device, class masks on the host."""
import numpy as np
import torch
import torch.nn as nn

from utils.checkpoint import STAGE2_FORMAT, CheckpointError, load_checkpoint
from utils.config import background_index
from utils.settings import SETTINGS
from utils.data.transforms import normalize_batch
from utils.evaluation.postprocess import class_indices
from utils.stage2.sliding_window import sliding_window_logits

META_KEYS = ("encoder", "classes", "palette", "mean", "std", "window", "overlap")


class FlipAveraged(nn.Module):
    """Test-time augmentation: a segmenter's logits averaged over the image, its horizontal flip and its
    vertical flip (each flipped back), in eval mode."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x).float()
        logits = logits + self.model(x.flip(-1)).float().flip(-1)
        logits = logits + self.model(x.flip(-2)).float().flip(-2)
        return logits / 3.0


def segmenter_meta(cfg):
    """What a stage-2 model file carries so that inference needs nothing else, the hub included: the timm
    architecture behind a `hf-hub:` name and the kwargs of its hub config, the YAML's encoder kwargs as
    written (class names, not classes) and the ViT block."""
    from models.timm_encoder import timm_architecture
    architecture, hub_args, _ = timm_architecture(cfg.stage2.encoder)
    return {"encoder": cfg.stage2.encoder, "encoder_architecture": architecture, "encoder_hub_args": hub_args,
            "encoder_kwargs": dict(cfg.stage2.encoder_kwargs), "vit_block": cfg.stage2.vit_block,
            "encoder_stage": cfg.stage2.encoder_stage,
            "classes": list(cfg.data.classes),
            "palette": [list(c) for c in cfg.data.palette], "mean": list(cfg.data.mean),
            "std": list(cfg.data.std), "window": cfg.stage2.window, "overlap": cfg.stage2.overlap,
            "background": background_index(cfg.data.classes, cfg.data.background),
            # microns per pixel of the training images: slides are analysed at this resolution (None: unknown)
            "mpp": None if cfg.data.mpp is None else float(cfg.data.mpp),
            "tta_flip": cfg.stage2.tta_flip, "refinement_attention": cfg.stage2.refinement_attention,
            "refinement_hidden": refinement_hidden(cfg.stage2.refinement_hidden, len(cfg.data.classes)),
            "refinement_gate_scale": cfg.stage2.refinement_gate_scale,
            # post-processing the data set's YAML defines; inference applies it only when asked to
            "fill_holes": class_indices(cfg.data.classes, cfg.postprocess.fill_holes)}


def saved_refinement_width(weights):
    """The refinement attention's hidden width in a file from before it was recorded (None: no attention)."""
    tensor = weights.get("refine.channel_gate.1.weight")
    return None if tensor is None else int(tensor.shape[0])


def refinement_hidden(setting, num_classes):
    """The refinement attention's hidden width: the setting, or the published 16-fold squeeze (at least 1)."""
    return setting or max(1, num_classes // 16)


# Metadata values checked by the rules of the settings they were saved from (utils/settings.py).
META_SETTINGS = {"classes": "data.classes", "palette": "data.palette", "mean": "data.mean", "std": "data.std",
                 "window": "stage2.window", "overlap": "stage2.overlap", "mpp": "data.mpp",
                 "vit_block": "stage2.vit_block", "encoder_stage": "stage2.encoder_stage",
                 "refinement_hidden": "stage2.refinement_hidden", "refinement_gate_scale": "stage2.refinement_gate_scale"}


def check_meta(meta, path):
    """A model file's metadata as inference trusts it: each value allowed by its setting's rule, one colour per
    class, the background and filled classes among them. A file edited by hand fails here, not mid-run."""
    def refuse(what):
        raise CheckpointError(f"{path}: its metadata holds {what}; the file was edited or damaged, so re-export it "
                              "with 2_train_stage2.py.")

    for name, setting in META_SETTINGS.items():
        allowed = SETTINGS[setting][1]
        value = meta.get(name, SETTINGS[setting][0])  # files from before a setting: its default
        try:
            allowed.clean(value)
        except ValueError:
            refuse(f"{name} {value!r}, where {allowed.text} belongs")
        if value is None and name in ("mean", "std"):
            refuse(f"no {name}")
    classes = meta["classes"]
    if len(meta["palette"]) != len(classes):
        refuse(f"{len(meta['palette'])} colours for {len(classes)} classes")
    in_range = [None, *range(len(classes))]
    if meta.get("background", 0) not in in_range or isinstance(meta.get("background"), bool):
        refuse(f"background {meta.get('background')!r}, which is no class index (0 to {len(classes) - 1}) or null")
    fill = meta.get("fill_holes", [])
    if not isinstance(fill, list) or any(index not in in_range[1:] or isinstance(index, bool) for index in fill):
        refuse(f"fill_holes {fill!r}, which are not all class indices (0 to {len(classes) - 1})")
    if not isinstance(meta["encoder"], str) or not meta["encoder"]:
        refuse(f"encoder {meta['encoder']!r}")


def load_segmenter(path, device):
    """A DPR model and its metadata from a stage-2 .pth or .safetensors file of this project."""
    from models.dpr import DPR
    payload = load_checkpoint(path, STAGE2_FORMAT)
    meta = payload.get("meta") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its metadata is not a mapping; re-export it with 2_train_stage2.py.")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: a stage-2 file without {', '.join(missing)} in its metadata; "
                              "re-export it with 2_train_stage2.py.")
    check_meta(meta, path)
    from utils.config import ConfigError
    from utils.timm_settings import model_kwargs

    # Files from before ViT encoders carry neither the architecture nor kwargs: a registry name without any.
    architecture = meta.get("encoder_architecture", meta["encoder"])
    try:
        kwargs = {**meta.get("encoder_hub_args", {}), **model_kwargs(meta.get("encoder_kwargs", {}), "encoder_kwargs")}
    except ConfigError as error:
        raise CheckpointError(f"{path}: its metadata holds {error}") from None
    # Built without memory on the meta device, then given the file's tensors: random initialisation of
    # weights about to be replaced took most of the start-up time.
    try:
        with torch.device("meta"):
            model = DPR(architecture, len(meta["classes"]), pretrained=False,
                        refine=meta.get("refinement_attention", True), aux=False, encoder_kwargs=kwargs,
                        refine_hidden=meta.get("refinement_hidden", saved_refinement_width(payload["model"])),
                        refine_gate_scale=meta.get("refinement_gate_scale", 1.0),
                        vit_block=meta.get("vit_block", -1), encoder_stage=meta.get("encoder_stage"))
    except (ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its encoder {architecture} cannot be built with this timm "
                              f"({str(error).splitlines()[0][:200]}).") from None
    # the auxiliary path only trains: it is neither built nor loaded for prediction
    weights = {name: tensor for name, tensor in payload["model"].items() if not name.startswith("aux_head.")}
    try:
        model.load_state_dict(weights, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: its weights do not fit a {meta['encoder']} DPR "
                              f"({str(error).splitlines()[0][:200]}).") from None
    unfilled = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if unfilled:
        raise CheckpointError(f"{path}: its weights leave {', '.join(unfilled[:5])} of the {meta['encoder']} DPR "
                              "unset; re-export it with 2_train_stage2.py.")
    # One layout whatever the file kept (.pth keeps channels-last strides, .safetensors is contiguous), so
    # both give bit-identical predictions; channels-last is also the fast layout for convolutions.
    return model.to(device, memory_format=torch.channels_last).eval(), meta


@torch.no_grad()
def predict_logits(model, image, runtime, window, overlap, batch_size, mean, std, num_classes):
    """Class logits (1 x C x H x W float32, on the device) for one H x W x 3 uint8 image of any size."""
    tensor = normalize_batch(torch.from_numpy(np.ascontiguousarray(image))[None].to(runtime.device), mean, std)

    def run(batch):
        with runtime.autocast():
            return model(batch.contiguous(memory_format=torch.channels_last)).float()

    return sliding_window_logits(run, tensor, num_classes, window, overlap, batch_size)


def predict_mask(model, image, runtime, window, overlap, batch_size, mean, std, num_classes):
    """H x W uint8 class mask (the argmax of predict_logits), without any post-processing."""
    logits = predict_logits(model, image, runtime, window, overlap, batch_size, mean, std, num_classes)
    return logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
