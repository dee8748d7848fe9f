"""One config object per run: the defaults, a dataset YAML on top, then `--set key=value` overrides.

utils/settings.py lists every key a YAML may use, with its default and the values it accepts. Every value is
checked against it before any work starts; a refused one stops the run with one sentence that names the key, the
value, what is allowed and where the value came from (which YAML file, or which command-line option).
"""
import argparse
import copy
from pathlib import Path

import yaml

from utils.errors import ConfigError, source_of  # noqa: F401  (apart, for timm_settings; importable from here)
from utils.files import write_text
from utils.settings import DEFAULTS, FREE_MAPPINGS, MODEL_KWARGS, MOVED, SETTINGS


class Config(dict):
    """A nested dict with attribute access: cfg.stage1.lr."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value

    def to_dict(self):
        return {k: (v.to_dict() if isinstance(v, Config) else copy.deepcopy(v)) for k, v in self.items()}


def _wrap(value):
    if isinstance(value, dict):
        return Config({k: _wrap(v) for k, v in value.items()})
    return value


def _merge(base, update, source, origins, prefix=""):
    """Lay `update` over `base`, recording each key's source in `origins`; values are checked later, once all
    layers are in, so that a base file's value a variant replaces is never judged."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if dotted in MOVED:
            raise ConfigError(f"{source}: '{dotted}' was replaced by {MOVED[dotted]}.")
        if key not in base:
            raise ConfigError(f"{source}: unknown key '{dotted}'; known keys here: {', '.join(sorted(map(str, base)))}.")
        if isinstance(base[key], dict) and dotted not in FREE_MAPPINGS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping of settings, not {value!r}.")
            _merge(base[key], value, source, origins, dotted + ".")
            continue
        if dotted in FREE_MAPPINGS and isinstance(value, dict) and isinstance(base[key], dict):
            value = {**base[key], **value}
        base[key] = value
        origins[dotted] = source


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(cfg, dotted, value):
    *sections, leaf = dotted.split(".")
    node = cfg
    for section in sections:
        node = node[section]
    node[leaf] = value


def shown(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_value(key, value, source):
    """The value as stored, or a ConfigError naming the key, the value, what is allowed and the source."""
    allowed = SETTINGS[key][1]
    try:
        return allowed.clean(value)
    except ValueError:
        raise ConfigError(f"{source}: '{key}' is {shown(value)}, but it must be {allowed.text}.") from None


def _check_values(cfg, origins):
    for key in SETTINGS:
        _set(cfg, key, check_value(key, _get(cfg, key), origins.get(key, "the defaults")))


def _check_together(cfg, origins):
    """Rules between settings; the message names the source of each setting involved."""
    def where(*keys):
        sources = list(dict.fromkeys(origins.get(key, "the defaults") for key in keys))
        if len(sources) == 1:
            return sources[0]
        return "; ".join(f"{key} from {origins.get(key, 'the defaults')}" for key in keys)

    classes, palette = cfg["data"]["classes"], cfg["data"]["palette"]
    if len(palette) != len(classes):
        raise ConfigError(f"{where('data.palette', 'data.classes')}: 'data.palette' needs one [R, G, B] colour per "
                          f"class ({len(classes)} classes, {len(palette)} colours).")
    for key in ("postprocess.fill_holes", "stage1.pseudo_mask_fill_holes"):
        unknown = [name for name in _get(cfg, key) if name not in classes]
        if unknown:
            raise ConfigError(f"{where(key, 'data.classes')}: '{key}' names {unknown}, which are not in "
                              f"data.classes {classes}.")
    background = cfg["data"]["background"]
    if background is not None and background not in classes:
        raise ConfigError(f"{where('data.background', 'data.classes')}: 'data.background' is {background!r}, which "
                          f"is not in data.classes {classes}; name the background class, or set it to null when "
                          "every class is a tissue.")
    if background is not None and background in cfg["postprocess"]["fill_holes"]:
        raise ConfigError(f"{where('postprocess.fill_holes')}: 'postprocess.fill_holes' names the background class "
                          f"{background!r}.")
    splits = cfg["data"]["test_splits"]
    if any(s in ("train", "val") or "/" in s or "\\" in s for s in splits):
        raise ConfigError(f"{where('data.test_splits')}: 'data.test_splits' must list folder names under data.root "
                          f"other than train and val, got {splits!r}.")
    titles = cfg["data"]["split_titles"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in titles.items()):
        raise ConfigError(f"{where('data.split_titles')}: 'data.split_titles' maps split folders to names, e.g. "
                          f"{{test: Test A}}; got {titles!r}.")
    if cfg["stage1"]["background_cam_scale"] != 1 and background is None:
        raise ConfigError(f"{where('stage1.background_cam_scale', 'data.background')}: "
                          "'stage1.background_cam_scale' weighs the background class, but 'data.background' is "
                          "null; leave it at 1.")
    smallest = min(cfg["stage1"]["cam_scales"]) * cfg["stage1"]["image_size"]
    if smallest < 8:
        raise ConfigError(f"{where('stage1.cam_scales', 'stage1.image_size')}: 'stage1.cam_scales' "
                          f"{cfg['stage1']['cam_scales']} shows the {cfg['stage1']['image_size']} px tiles at "
                          f"{smallest:g} px, less than the classifier's stride of 8 px; use scales of at least "
                          f"{8 / cfg['stage1']['image_size']:.3g}.")
    if cfg["stage2"]["epochs"] == 0 and cfg["stage2"]["init_from"] is None:
        raise ConfigError(f"{where('stage2.epochs', 'stage2.init_from')}: 'stage2.epochs' is 0, which only scores "
                          "the model stage2.init_from names, and stage2.init_from is null; set stage2.epochs above "
                          "0 to train one, or stage2.init_from to a stage-2 model file.")
    from utils.timm_settings import model_kwargs
    for key in MODEL_KWARGS:
        try:
            model_kwargs(_get(cfg, key), key)
        except ConfigError as error:
            raise ConfigError(f"{where(key)}: {error}") from None


def parse_override(text):
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: write it as key=value, e.g. --set stage1.epochs=3.")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    update = value
    for part in reversed(key.strip().split(".")):
        update = {part: update}
    return update


def _config_layers(path, seen=()):
    """[(source, settings)] of a YAML file, preceded by those of the file its `base:` key names (a path relative
    to it), so that a variant of a recipe states only what it changes."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]}).") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read as a text file ({type(error).__name__}).") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings.")
    base = loaded.pop("base", None)
    if base is None:
        return [(str(path), loaded)]
    base_path = path.parent / str(base)
    if not isinstance(base, str) or not base_path.is_file():
        raise ConfigError(f"{path}: 'base' must name another config file beside it; {base_path} does not exist.")
    if base_path.resolve() in seen or base_path.resolve() == path.resolve():
        raise ConfigError(f"{path}: 'base: {base}' leads back to a file already read; break the loop.")
    return _config_layers(base_path, seen + (path.resolve(),)) + [(str(path), loaded)]


def load_config(path=None, overrides=()):
    """Defaults <- YAML file <- overrides; every value checked; returns a Config.

    An override is "key=value" (shown as `--set key=value` in messages) or a pair ("key=value", how the user
    wrote it, such as "--stage1-epochs 0")."""
    cfg, origins = copy.deepcopy(DEFAULTS), {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pick one in configs/.")
        layers = _config_layers(path)
        for source, loaded in layers:
            _merge(cfg, loaded, source, origins)
        cfg["name"] = layers[-1][1].get("name", path.stem)  # a base file's name is not inherited
        origins["name"] = str(path)
    for override in overrides:
        text, source = override if isinstance(override, tuple) else (override, f"--set {override}")
        _merge(cfg, parse_override(text), source, origins)
    _check_values(cfg, origins)
    _check_together(cfg, origins)
    config = _wrap(cfg)
    object.__setattr__(config, "_origins", origins)  # an attribute, not a setting: never saved
    return config


def save_config(cfg, path):
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run_dir(cfg, stage):
    return Path(cfg.runs_dir) / cfg.name / stage


def background_index(classes, background):
    """Index of the background class in `classes`, or None when every class is a tissue."""
    return None if background is None else list(classes).index(background)


def pseudo_mask_dir(cfg):
    return Path(cfg.data.pseudo_mask_dir or Path(cfg.data.root) / "train" / "pseudo_mask")


def base_parser(description, default_config="configs/demo.yaml"):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="dataset YAML (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set stage1.epochs=3 (repeatable)")
    return parser
