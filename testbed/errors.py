"""Errors raised for bad user input, before any training starts."""


class TestbedError(Exception):
    """Base class: a message that names the key or file, the bad value and what is allowed."""


class ConfigError(TestbedError, ValueError):
    """A configuration value that cannot work."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}': got {value!r}; allowed: {allowed}")


class DataError(TestbedError, ValueError):
    """A data file or data source that cannot be used."""


class CheckpointError(TestbedError, ValueError):
    """A checkpoint that cannot be loaded into the configured model."""
