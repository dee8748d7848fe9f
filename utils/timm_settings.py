"""The YAML side of timm networks: model kwargs that name classes, the normalisation a model's weights
expect, and sizes checked against a Vision Transformer's patch."""
import functools
import re

from utils.errors import ConfigError, source_of

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def names_a_class(key):
    """Model kwargs whose value is a layer class (`mlp_layer`, `act_layer`, `norm_layer`, `block_fn`)."""
    return key.endswith("_layer") or key == "block_fn"


def _is_layer(candidate):
    target = candidate.func if isinstance(candidate, functools.partial) else candidate  # timm's SwiGLUPacked
    import torch.nn as nn
    return isinstance(target, type) and issubclass(target, nn.Module)


def layer_class(name):
    """The timm.layers or torch.nn class (or timm's preset partial) a YAML string names; None if none."""
    import timm.layers
    import torch.nn as nn
    for prefix in ("timm.layers.", "torch.nn.", "nn."):
        name = name.removeprefix(prefix)
    for namespace in (timm.layers, nn):
        candidate = getattr(namespace, name, None)
        if candidate is not None and _is_layer(candidate):
            return candidate
    return None


def model_kwargs(raw, setting):
    """The `*_kwargs` of a YAML as timm.create_model takes them: class names become the classes, numbers
    that YAML left as strings (`1e-5`) become numbers. An unknown class name is a ConfigError naming it."""
    kwargs = {}
    for key, value in (raw or {}).items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"'{setting}' has the key {key!r}; keys are keyword arguments of timm.create_model.")
        if names_a_class(key) and isinstance(value, str):
            found = layer_class(value)
            if found is None:
                raise ConfigError(f"'{setting}.{key}' is {value!r}, which names no layer class of timm.layers or "
                                  "torch.nn (for example SwiGLUPacked, SwiGLU, Mlp, SiLU, GELU, LayerNorm).")
            value = found
        elif isinstance(value, str) and _NUMBER.match(value):
            value = float(value)
        kwargs[key] = value
    return kwargs


def stage_model(cfg, stage):
    """(setting, timm name, raw kwargs, kwargs setting) of the network a stage trains."""
    if stage == "stage1":
        return "stage1.backbone", cfg.stage1.backbone, cfg.stage1.backbone_kwargs, "stage1.backbone_kwargs"
    return "stage2.encoder", cfg.stage2.encoder, cfg.stage2.encoder_kwargs, "stage2.encoder_kwargs"


def resolve_normalisation(cfg, stage):
    """Fill data.mean and data.std, where the YAML leaves them out, from the pretrained_cfg of the stage's
    network (ImageNet's when it has none). Returns a line that says where they came from, or None."""
    if cfg.data.mean is not None and cfg.data.std is not None:
        return None
    setting, name, _, _ = stage_model(cfg, stage)
    from models.timm_encoder import pretrained_normalisation
    try:
        found = None if name == "resnet38" else pretrained_normalisation(name)
    except ValueError as error:
        raise ConfigError(f"{setting}: {error}") from None
    mean, std = found or (IMAGENET_MEAN, IMAGENET_STD)
    source = f"the pretrained_cfg of {name}" if found else "ImageNet"
    if cfg.data.mean is None:
        cfg.data.mean = mean
    if cfg.data.std is None:
        cfg.data.std = std
    return f"normalisation from {source}: mean {cfg.data.mean}, std {cfg.data.std}"


def check_patch_multiple(value, multiple, setting, name):
    """A ViT sees whole patches: a size that is not a multiple of its patch is a ConfigError naming it."""
    if multiple > 1 and value % multiple:
        lower, upper = value - value % multiple, value - value % multiple + multiple
        suggestion = f"{lower} or {upper}" if lower > 0 else str(upper)
        raise ConfigError(f"{setting}={value} is not a multiple of the {multiple} px patches of {name}; "
                          f"use {suggestion}.")


class NetworkFacts:
    """What a script checks before it builds a stage's timm network: the kwargs as timm takes them, whether
    it is a Vision Transformer, its patch size and depth, and a convolutional network's number of feature stages."""

    def __init__(self, kwargs, vit, patch=1, depth=0, stages=None):
        self.kwargs, self.vit, self.patch, self.depth, self.stages = kwargs, vit, patch, depth, stages


def inspect_network(cfg, stage):
    """NetworkFacts of a stage's network (ResNet-38: not a timm one). An unknown name, a hub that cannot be
    reached or kwargs the model does not take are a ConfigError naming the setting."""
    setting, name, raw, kwargs_setting = stage_model(cfg, stage)
    kwargs = model_kwargs(raw, kwargs_setting)
    if name == "resnet38":
        if kwargs:
            raise ConfigError(f"'{kwargs_setting}' applies to timm networks, not resnet38; remove it.")
        return NetworkFacts(kwargs, vit=False)
    from models.timm_encoder import encoder_feature_info, is_plain_vit
    try:
        info, model = encoder_feature_info(name, kwargs)
    except TypeError as error:  # a keyword the model's class does not take
        raise ConfigError(f"'{kwargs_setting}' does not fit {name} ({str(error).splitlines()[0][:200]}).") from None
    except (ValueError, RuntimeError) as error:
        raise ConfigError(f"{setting}: {str(error).splitlines()[0]}") from None
    if not is_plain_vit(model):
        return NetworkFacts(kwargs, vit=False, stages=len(info.reduction()))
    patch = model.patch_embed.patch_size
    patch = patch if isinstance(patch, int) else patch[0]
    return NetworkFacts(kwargs, vit=True, patch=patch, depth=len(model.blocks))


def check_vit_settings(cfg, stage, facts):
    """Sizes against the patch, tapped blocks against the depth; layer decay only where there are blocks."""
    from models.timm_vit import resolve_blocks
    setting, name, _, _ = stage_model(cfg, stage)
    settings = cfg.stage1 if stage == "stage1" else cfg.stage2
    if stage == "stage2" and settings.encoder_stage is not None:
        if facts.vit:
            raise ConfigError(f"'stage2.encoder_stage' applies to convolutional encoders; {name} is a Vision "
                              "Transformer, whose block is chosen by 'stage2.vit_block'.")
        from models.dpr import stride8_out_indices
        try:
            stride8_out_indices(name, facts.kwargs, settings.encoder_stage)
        except ValueError as error:
            raise ConfigError(f"'stage2.encoder_stage': {error}") from None
    if not facts.vit:
        if stage == "stage1" and facts.stages is not None:
            outside = [i for i in settings.out_indices if not -facts.stages <= i < facts.stages]
            if outside:
                raise ConfigError(f"{source_of(cfg, 'stage1.out_indices')}: 'stage1.out_indices' "
                                  f"{list(settings.out_indices)} names stages {name} does not have: its feature "
                                  f"stages are 0 to {facts.stages - 1} (or -1 to -{facts.stages} from the end).")
        if settings.layer_decay != 1:
            raise ConfigError(f"'{stage}.layer_decay' applies to Vision Transformers, and {name} is not one; set "
                              "it to 1.0.")
        if name == "resnet38" and settings.grad_checkpointing:
            raise ConfigError(f"'{stage}.grad_checkpointing' applies to timm networks, not resnet38.")
        return
    if stage == "stage1":
        check_patch_multiple(settings.image_size, facts.patch, "stage1.image_size", name)
        blocks, key, count = settings.vit_blocks, "stage1.vit_blocks", 3
    else:
        for key in ("crop_size", "window"):
            check_patch_multiple(settings[key], facts.patch, f"stage2.{key}", name)
        if cfg.inference.window is not None:
            check_patch_multiple(cfg.inference.window, facts.patch, "inference.window", name)
        blocks, key, count = [settings.vit_block], "stage2.vit_block", 1
    try:
        resolve_blocks(blocks, facts.depth, count)
    except ValueError as error:
        raise ConfigError(f"'{key}': {error}") from None
