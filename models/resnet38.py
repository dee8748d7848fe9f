"""ResNet-38 (model A1 of Wu et al., "Wider or Deeper"), dilated to output stride 8.

Pre-activation residual blocks (BN -> ReLU -> conv). Parameter names follow the standard ImageNet
file `ilsvrc-cls_rna-a1_cls1000_ep-0001.pth` so that it loads with strict key checking.

Layout (channels in -> mid -> out, stride, dilation):
    conv1a            3x3 conv 3 -> 64
    b2, b2_1, b2_2    basic 64/128 -> 128 -> 128, stride 2 on b2
    b3, b3_1, b3_2    basic 128/256 -> 256 -> 256, stride 2 on b3
    b4, b4_1..b4_5    basic 256/512 -> 512 -> 512, stride 2 on b4
    b5, b5_1, b5_2    basic 512/1024 -> 512 -> 1024, dilation 2 (first conv of b5: 1)
    b6                bottleneck 1024 -> 512/1024 -> 2048, dilation 4, dropout 0.3
    b7                bottleneck 2048 -> 1024/2048 -> 4096, dilation 4, dropout 0.5
    bn7               BatchNorm 4096
"""
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F

from utils.checkpoint import describe_misfit, read_weight_file

# Keys of the ImageNet classifier layer; the segmentation pipeline has its own heads.
CLASSIFIER_PREFIXES = ("fc8.", "linear1000.", "fc.")


def _conv(in_channels, out_channels, kernel_size, stride=1, dilation=1):
    padding = dilation * (kernel_size // 2)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                     dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; a 1x1 projection on the activated input when the shape changes."""

    def __init__(self, in_channels, mid_channels, out_channels, stride=1, dilation=1, first_dilation=None):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = _conv(in_channels, mid_channels, 3, stride, first_dilation)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = _conv(mid_channels, out_channels, 3, 1, dilation)
        self.has_projection = stride != 1 or in_channels != out_channels
        if self.has_projection:
            self.conv_branch1 = _conv(in_channels, out_channels, 1, stride)

    def forward(self, x, return_activated_input=False):
        """With `return_activated_input`, also return ReLU(bn_branch2a(x)), computed here anyway."""
        activated = F.relu(self.bn_branch2a(x), inplace=True)
        shortcut = self.conv_branch1(activated) if self.has_projection else x
        branch = self.conv_branch2a(activated)
        branch = F.relu(self.bn_branch2b1(branch), inplace=True)
        # In place on a fresh conv output: conv backward does not need its own output.
        out = self.conv_branch2b1(branch).add_(shortcut)
        return (out, activated) if return_activated_input else out


class BottleneckBlock(nn.Module):
    """1x1 (out/4) -> dilated 3x3 (out/2) -> 1x1 (out), with a 1x1 projection shortcut.

    Dropout2d sits after each inner BN-ReLU, i.e. before conv_branch2b1 and before conv_branch2b2,
    the placement of the widely used PSA/SEAM ResNet-38.
    """

    def __init__(self, in_channels, out_channels, stride=1, dilation=1, dropout=0.0):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = _conv(in_channels, out_channels // 4, 1, stride)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = _conv(out_channels // 4, out_channels // 2, 3, 1, dilation)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = _conv(out_channels // 2, out_channels, 1)
        self.conv_branch1 = _conv(in_channels, out_channels, 1, stride)

    def forward(self, x, return_activated_input=False):
        """With `return_activated_input`, also return ReLU(bn_branch2a(x)), computed here anyway."""
        activated = F.relu(self.bn_branch2a(x), inplace=True)
        shortcut = self.conv_branch1(activated)
        branch = self.conv_branch2a(activated)
        branch = self.dropout_2b1(F.relu(self.bn_branch2b1(branch), inplace=True))
        branch = self.conv_branch2b1(branch)
        branch = self.dropout_2b2(F.relu(self.bn_branch2b2(branch), inplace=True))
        out = self.conv_branch2b2(branch).add_(shortcut)
        return (out, activated) if return_activated_input else out


class ResNet38(nn.Module):
    """Dilated ResNet-38 backbone, output stride 8.

    `encode` runs up to b6 and returns the two intermediate taps; `finish` runs b7 and bn7.
    Modules in between (e.g. an attention block on the b6 output) go between the two calls.
    """

    tap_channels = (512, 1024, 4096)  # f45, f52, f7
    channels_before_deepest = 2048  # output of b6, where the paper puts IBM

    def __init__(self):
        super().__init__()
        self.conv1a = _conv(3, 64, 3)

        self.b2 = BasicBlock(64, 128, 128, stride=2)
        self.b2_1 = BasicBlock(128, 128, 128)
        self.b2_2 = BasicBlock(128, 128, 128)

        self.b3 = BasicBlock(128, 256, 256, stride=2)
        self.b3_1 = BasicBlock(256, 256, 256)
        self.b3_2 = BasicBlock(256, 256, 256)

        self.b4 = BasicBlock(256, 512, 512, stride=2)
        self.b4_1 = BasicBlock(512, 512, 512)
        self.b4_2 = BasicBlock(512, 512, 512)
        self.b4_3 = BasicBlock(512, 512, 512)
        self.b4_4 = BasicBlock(512, 512, 512)
        self.b4_5 = BasicBlock(512, 512, 512)

        self.b5 = BasicBlock(512, 512, 1024, dilation=2, first_dilation=1)
        self.b5_1 = BasicBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = BasicBlock(1024, 512, 1024, dilation=2)

        self.b6 = BottleneckBlock(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = BottleneckBlock(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)

    def encode(self, x):
        """Image -> (f45, f52, x6).

        f45 = ReLU(BN(b4_5 output)) and f52 = ReLU(BN(b5_2 output)) are the activated inputs of b5
        and b6 (their bn_branch2a), so the taps cost nothing extra. x6 is the b6 output (2048 ch).
        """
        x = self.conv1a(x)
        for block in (self.b2, self.b2_1, self.b2_2, self.b3, self.b3_1, self.b3_2,
                      self.b4, self.b4_1, self.b4_2, self.b4_3, self.b4_4, self.b4_5):
            x = block(x)
        x, f45 = self.b5(x, return_activated_input=True)
        x = self.b5_2(self.b5_1(x))
        x6, f52 = self.b6(x, return_activated_input=True)
        return f45, f52, x6

    def finish(self, x6):
        """b6 output (2048 ch) -> f7 = ReLU(bn7(b7(x6))) (4096 ch)."""
        return F.relu(self.bn7(self.b7(x6)), inplace=True)

    def taps(self, x, between=None):
        """Image -> (f45, f52, f7); `between` (IBM) acts on b6's output before b7 reads it."""
        f45, f52, x6 = self.encode(x)
        return f45, f52, self.finish(x6 if between is None else between(x6))

    def forward(self, x):
        """Image -> (f45, f52, f7) without anything between b6 and b7."""
        return self.taps(x)


def load_resnet38_weights(model, path):
    """Load a ResNet-38 weight file into `model`, checking every key and shape.

    The file may hold a plain state dict or a dict with "state_dict" or "model". ImageNet classifier
    keys (fc8.*, linear1000.*, fc.*) are skipped on purpose. BatchNorm `num_batches_tracked`
    counters may be absent (the standard file predates them). Anything else that does not match
    raises ValueError naming the keys and the file.
    Returns {"loaded": number of tensors loaded, "skipped": sorted skipped keys}.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ResNet-38 weight file {path} does not exist; "
                                f"download ilsvrc-cls_rna-a1_cls1000_ep-0001.pth there or fix the path.")
    state = read_weight_file(path, "ResNet-38 weight file")

    expected = model.state_dict()
    skipped = sorted(key for key in state if key.startswith(CLASSIFIER_PREFIXES))
    provided = {key: value for key, value in state.items() if not key.startswith(CLASSIFIER_PREFIXES)}

    missing = [key for key in expected
               if key not in provided and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in provided if key not in expected]
    wrong_shape = [f"{key} {tuple(value.shape)} vs {tuple(expected[key].shape)}"
                   for key, value in provided.items()
                   if key in expected and value.shape != expected[key].shape]
    misfit = describe_misfit(missing, unexpected, wrong_shape)
    if misfit:
        raise ValueError(f"ResNet-38 weight file {path} does not match the network; {misfit}.")

    # Counters absent from the file keep the model's values, so the strict load below still checks all keys.
    merged = dict(expected)
    merged.update(provided)
    model.load_state_dict(merged, strict=True)
    return {"loaded": len(provided), "skipped": skipped}
