"""The config error, in a module of its own so that config validation and the timm settings it calls can
both raise it without importing each other."""


class ConfigError(ValueError):
    """A wrong key or value in a config; the message names the key."""
