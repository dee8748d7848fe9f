"""A timm network used as a feature extractor: where its architecture comes from, the description of its
stages, and local weight files.

Every function takes the model kwargs that are passed to `timm.create_model` (already turned into Python
objects: `mlp_layer` is a class, not its name), since they change the layers and so the weights that fit.
"""
import functools
from pathlib import Path

import timm
import torch
from timm.models import FeatureInfo

from utils.checkpoint import describe_misfit, read_weight_file
from utils.weight_packages import is_package_source, package_weight_file, rename_by_order

HUB_PREFIXES = ("hf-hub:", "hf_hub:")


def is_hub_name(name):
    return name.startswith(HUB_PREFIXES)


@functools.lru_cache(maxsize=None)
def _architecture(name):
    if not is_hub_name(name):
        if not timm.is_model(name):
            raise ValueError(f"unknown timm encoder '{name}'; pick a name from timm.list_models() or a "
                             "hf-hub: name.")
        return name, {}, None
    repo = name.split(":", 1)[1]
    try:
        pretrained_cfg, architecture, model_args = timm.models.load_model_config_from_hf(repo)
    except Exception as error:  # offline, gated, misspelt: huggingface_hub raises many kinds
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(f"the config of '{name}' could not be read from the Hugging Face hub ({detail}). Gated "
                         "models need their licence accepted on the model page and a login (`hf auth login` or "
                         "HF_TOKEN); without internet, name the timm architecture with its kwargs and give a "
                         "local weight file instead (README, 'Pathology foundation models').") from None
    return architecture, dict(model_args or {}), dict(pretrained_cfg or {})


def timm_architecture(name):
    """(timm registry name, model kwargs of the hub config, pretrained cfg or None) of a model name.

    A `hf-hub:` name reads its config.json from the hub once per process; a registry name needs nothing.
    A rebuild from the registry name and the kwargs gives the same layers without the hub.
    """
    architecture, model_args, pretrained_cfg = _architecture(name)
    return architecture, dict(model_args), (dict(pretrained_cfg) if pretrained_cfg is not None else None)


def pretrained_normalisation(name):
    """(mean, std) that the model's pretrained weights expect, from its pretrained_cfg; None when unknown."""
    architecture, _, hub_cfg = timm_architecture(name)
    cfg = hub_cfg if hub_cfg is not None else timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    if cfg is not None and not isinstance(cfg, dict):
        cfg = cfg.to_dict()
    if not cfg or not cfg.get("mean") or not cfg.get("std"):
        return None
    return [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]


def create_timm_model(name, pretrained=False, kwargs=None, **options):
    """timm.create_model with the hub config's kwargs, then `kwargs`, then `options` on top.

    Without hub weights the model is built from its registry name, so a `hf-hub:` name reads only its
    (cached) config from the hub, once.
    """
    architecture, model_args, _ = timm_architecture(name)
    merged = {**model_args, **(kwargs or {}), **options}
    if pretrained is not True:
        return drop_blocks_after_last_output(timm.create_model(architecture, pretrained=False, **merged))
    try:
        return drop_blocks_after_last_output(timm.create_model(name, pretrained=True, **merged))
    except OSError as error:  # no connection, a gated repository, a missing file
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(f"the weights of '{name}' could not be downloaded ({detail}). Gated models need their "
                         "licence accepted on the model page and a login (`hf auth login` or HF_TOKEN); without "
                         "internet, set pretrained to the path of a local weight file.") from None


def drop_blocks_after_last_output(net):
    """timm's own feature extractors of EfficientNet and MobileNet run every block, even those after the last
    stage asked for; cut them, so that a network decoded at stride 8 does not pay for its deepest stages
    (for Lite0 decoded at its fourth stage, three quarters of the encoder's operations)."""
    taps = getattr(net, "_stage_out_idx", None)
    if taps and isinstance(getattr(net, "blocks", None), torch.nn.Sequential) and net.feature_hooks is None:
        net.blocks = net.blocks[:max(taps)]
    return net


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


@functools.lru_cache(maxsize=None)
def _describe(name, frozen_kwargs):
    # Built on the meta device: only the layer description is needed, not memory or weights.
    with torch.device("meta"):
        model = create_timm_model(name, False, dict(frozen_kwargs))
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, FeatureInfo)):
        raise ValueError(f"timm encoder '{name}' does not expose feature maps; pick a convolutional network or "
                         "a Vision Transformer.")
    if isinstance(info, list):
        info = FeatureInfo(info, out_indices=tuple(range(len(info))))
    return info, model


def encoder_feature_info(encoder_name, kwargs=None):
    """(FeatureInfo of every stage, the full model on the meta device); ValueError for unusable names."""
    return _describe(encoder_name, _hashable(kwargs or {}))


def is_plain_vit(model):
    """A Vision Transformer of one scale (ViT, DeiT, DINOv2, EVA): tokens of one patch grid in every block,
    with class or register tokens in front. Hierarchical transformers (Swin) have strided stages instead."""
    return all(hasattr(model, attr) for attr in ("patch_embed", "blocks", "num_prefix_tokens",
                                                 "forward_intermediates", "prune_intermediate_layers"))


def is_timm_vit(name, kwargs=None):
    """Whether a timm model name (with its kwargs) is a plain Vision Transformer."""
    return is_plain_vit(encoder_feature_info(name, kwargs)[1])


def _source_key_candidates(encoder_key):
    """timm's feature wrapper renames `stages.0` to `stages_0`; list the names a saved full model may use."""
    head, dot, rest = encoder_key.partition(".")
    names = [encoder_key]
    for i, char in enumerate(head):
        if char == "_":
            names.append(head[:i] + "." + head[i + 1:] + dot + rest)
    return names


def load_encoder_weights(encoder, encoder_name, path, kwargs=None):
    """Copy a local weight file, or the file a weight package ships (`package:<module>`), into a timm network
    cut short of the full model.

    The file may be a full timm checkpoint: keys of dropped deeper stages or blocks, or of the classifier
    head, are allowed; every key the network has must be there with its shape. A package's file may use
    other key names when its tensors line up, in order and shape, with the full timm network's.
    """
    if is_package_source(path):
        file = package_weight_file(path)
        origin = f"the weight file of {path} ({file})"
        _, full_model = encoder_feature_info(encoder_name, kwargs)
        shapes = {key: tensor.shape for key, tensor in full_model.state_dict().items()}
        state = rename_by_order(read_weight_file(file, "weight file"), shapes, origin, encoder_name)
        load_encoder_state(encoder, encoder_name, state, origin, kwargs)
        return
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weight file {path} does not exist; fix the path or use pretrained: false.")
    load_encoder_state(encoder, encoder_name, read_weight_file(path, "weight file"), f"weight file {path}", kwargs)


def load_encoder_state(encoder, encoder_name, state, origin, kwargs=None):
    """`load_encoder_weights` for weights already in memory ({timm full-model key: tensor}); `origin` names
    where they came from in errors."""
    _, full_model = encoder_feature_info(encoder_name, kwargs)
    architecture_keys = set(full_model.state_dict())
    target = encoder.state_dict()
    loaded, used, missing, wrong_shape = {}, set(), [], []
    for key, tensor in target.items():
        source = next((name for name in _source_key_candidates(key) if name in state), None)
        if source is None:
            if not key.endswith("num_batches_tracked"):  # absent from older files, carries no weight
                missing.append(key)
            continue
        used.add(source)
        if state[source].shape != tensor.shape:
            wrong_shape.append(f"{source} {tuple(state[source].shape)} vs {tuple(tensor.shape)}")
            continue
        loaded[key] = state[source]
    unexpected = [k for k in state if k not in used and k not in architecture_keys]
    misfit = describe_misfit(missing, unexpected, wrong_shape)
    if misfit:
        raise ValueError(f"{origin} does not fit timm network '{encoder_name}' ({misfit}).")
    encoder.load_state_dict(loaded, strict=False)


def freeze_first_stages(net, encoder_name, count, kwargs=None):
    """Freeze the stem and the first `count` feature stages of a timm network (timm's feature indices: 3 is
    every layer up to stride 8): no gradient, so no backward pass runs through them. Returns the frozen
    BatchNorm layers, which their owner keeps in eval mode so that their statistics stay pretrained."""
    if count <= 0:
        return []
    info, _ = encoder_feature_info(encoder_name, kwargs)
    if count > len(info.info):
        raise ValueError(f"'{encoder_name}' has {len(info.info)} feature stages; cannot freeze {count}.")
    last = info.info[count - 1]["module"]
    names = {last, last.replace(".", "_")}  # timm's feature wrappers rename `layer.0` to `layer_0`
    modules = list(net.named_modules())
    inside = [i for i, (name, _) in enumerate(modules) if name in names]
    if not inside:
        raise ValueError(f"'{encoder_name}': stage module {last} not found in the network.")
    end = inside[0] + 1
    while end < len(modules) and any(modules[end][0].startswith(n + ".") for n in names):
        end += 1
    frozen_norms = []
    for _, module in modules[:end]:
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            frozen_norms.append(module)
    return frozen_norms
