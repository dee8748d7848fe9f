"""The config error, and where a setting's value came from for its message, in a module of their own so that
config validation and the timm settings it calls can both use them without importing each other."""


class ConfigError(ValueError):
    """A wrong key or value in a config; the message names the key."""


def source_of(cfg, key):
    """Where a setting's value came from: a YAML file, a command-line option, or the defaults (recorded by
    utils.config.load_config)."""
    return getattr(cfg, "_origins", {}).get(key, "the defaults")
