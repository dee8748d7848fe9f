"""A timm network used as a feature extractor: the description of its stages, and local weight files."""
import functools
from pathlib import Path

import timm
import torch
from timm.models import FeatureInfo

from utils.checkpoint import describe_misfit, read_weight_file


@functools.lru_cache(maxsize=None)
def encoder_feature_info(encoder_name):
    """(FeatureInfo of every stage, the full model on the meta device); ValueError for unusable names."""
    if not timm.is_model(encoder_name):
        raise ValueError(f"unknown timm encoder '{encoder_name}'; pick a name from timm.list_models().")
    # Built on the meta device: only the layer description is needed, not memory or weights.
    with torch.device("meta"):
        model = timm.create_model(encoder_name, pretrained=False)
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, FeatureInfo)):
        raise ValueError(f"timm encoder '{encoder_name}' does not expose feature maps; pick a convolutional one.")
    if isinstance(info, list):
        info = FeatureInfo(info, out_indices=tuple(range(len(info))))
    return info, model


def _source_key_candidates(encoder_key):
    """timm's feature wrapper renames `stages.0` to `stages_0`; list the names a saved full model may use."""
    head, dot, rest = encoder_key.partition(".")
    names = [encoder_key]
    for i, char in enumerate(head):
        if char == "_":
            names.append(head[:i] + "." + head[i + 1:] + dot + rest)
    return names


def load_encoder_weights(encoder, encoder_name, path):
    """Copy a local weight file into a timm `features_only` network cut short of the full model.

    The file may be a full timm checkpoint: keys of dropped deeper stages or of the ImageNet classifier are
    allowed; every key the network has must be there with its shape.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weight file {path} does not exist; fix the path or use pretrained: false.")
    state = read_weight_file(path, "weight file")
    _, full_model = encoder_feature_info(encoder_name)
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
        raise ValueError(f"weight file {path} does not fit timm network '{encoder_name}' ({misfit}).")
    encoder.load_state_dict(loaded, strict=False)
