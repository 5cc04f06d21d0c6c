"""Name -> (class, config dataclass) registries of routers and losses: one file + one YAML adds one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from testbed.errors import ConfigError

T = TypeVar("T")


def label_of(cls: type) -> str:
    """A registered class's name in reports' words: its `label` class attribute, else its registry name."""
    label = getattr(cls, "label", None)
    return cls.registry_name if label is None else label


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

    def items(self) -> list[tuple[str, tuple[type[T], type]]]:
        """(name, (class, config dataclass)) of every entry, by name: what reads the registered classes'
        facts (their class attributes) iterates these."""
        return sorted(self._entries.items())

    def find(self, name: str) -> type[T] | None:
        """The class registered as `name`, or None (e.g. a name from an old summary no longer registered)."""
        entry = self._entries.get(name)
        return entry[0] if entry else None

    def get(self, name: str, key: str | None = None) -> tuple[type[T], type]:
        if name not in self._entries:
            raise ConfigError(key or self.config_key, name, f"one of {self.names()}")
        return self._entries[name]
