"""Name -> (class, config dataclass) registries of routers and losses: one file + one YAML adds one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from testbed.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A registry of named components, each with a config dataclass that validates its options."""

    def __init__(self, kind: str, config_key: str):
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, tuple[type[T], type]] = {}

    def register(self, name: str, config_cls: type) -> Callable[[type[T]], type[T]]:
        def decorate(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise RuntimeError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = (cls, config_cls)
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str, key: str | None = None) -> tuple[type[T], type]:
        if name not in self._entries:
            raise ConfigError(key or self.config_key, name, f"one of {self.names()}")
        return self._entries[name]

    def build_config(self, name: str, options: dict[str, Any], key: str | None = None) -> Any:
        """Validate `options` against the component's config dataclass (unknown keys and bad types fail)."""
        _, config_cls = self.get(name, key)
        key = key or self.config_key
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ConfigError(
                f"{key}.{unknown[0]}",
                options[unknown[0]],
                f"options of {self.kind} '{name}': {sorted(fields)}",
            )
        try:
            return config_cls(**options)
        except (TypeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(key, options, f"valid options for {self.kind} '{name}' ({err})") from err
