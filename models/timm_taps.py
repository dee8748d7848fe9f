"""Any timm backbone as a stage-1 feature extractor with three taps (its last three chosen stages)."""
import timm
import torch
import torch.nn as nn


def load_local_weights(module, path, skip_prefixes=("fc.", "head.", "classifier.", "fc8.", "linear1000.")):
    """Load a local weight file strictly, except an ImageNet classifier that is skipped on purpose."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
    skipped = [k for k in state if k.startswith(skip_prefixes)]
    state = {k: v for k, v in state.items() if k not in skipped}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{path}: does not fit the network (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, wrong shape {mismatched[:4]}).")
    module.load_state_dict(state, strict=True)
    return {"loaded": len(state), "skipped": skipped}


class TimmTaps(nn.Module):
    """`encode` gives (tap1, tap2, deepest); `finish` is the identity, so IBM acts on the deepest stage."""

    def __init__(self, name, pretrained=False, out_indices=(2, 3, 4), output_stride=8):
        super().__init__()
        kwargs = {"features_only": True, "out_indices": tuple(out_indices)}
        if output_stride and output_stride != 32:
            kwargs["output_stride"] = output_stride
        try:
            self.net = timm.create_model(name, pretrained=pretrained is True, **kwargs)
        except (TypeError, ValueError, RuntimeError) as error:
            if "output_stride" not in kwargs:
                raise
            kwargs.pop("output_stride")  # not every family supports dilation; fall back to its native strides
            self.net = timm.create_model(name, pretrained=pretrained is True, **kwargs)
            del error
        if isinstance(pretrained, str):
            load_local_weights(self.net, pretrained)
        channels = self.net.feature_info.channels()
        self.tap_channels = tuple(channels)
        self.ibm_channels = channels[-1]

    def encode(self, x):
        first, second, deepest = self.net(x)
        return first, second, deepest

    def finish(self, deepest):
        return deepest
