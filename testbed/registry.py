"""Name -> (class, config dataclass) registries of routers and losses.

A registry knows its components' names and option dataclasses without their implementations: the options
are declared in a torch-free module (`@ROUTERS.options("name")` on a dataclass in testbed/routing/options.py,
testbed/losses/options.py), so a config is composed and checked without importing torch. The implementation
classes (`@ROUTERS.register("name")`) are found the first time a class is asked for (`get`, `find`,
`items`): every module of the implementation package is imported then (found on disk, not listed). A name
with options but no class, or a class whose name has no options, is an error at that point.

The options also state what the config checks need to know of a component besides its values, its facts
(a router's `token_choice`, a loss's `stateful`, ...: the registry's `facts`), as class attributes of the
options class, and check the values themselves (their `check` method). `register` copies the facts onto
the implementation class, where the model, training and reports read them; a class that states a fact
itself is refused, so each fact is stated once, on the options.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

from testbed.errors import ConfigError

T = TypeVar("T")


def label_of(cls: type) -> str:
    """A registered class's name in reports' words: its `label` class attribute, else its registry name."""
    label = getattr(cls, "label", None)
    return cls.registry_name if label is None else label


class Registry(Generic[T]):
    """A registry of named components, each with a config dataclass that validates its options.

    `package`: the dotted name of the package whose modules define the implementation classes, imported on
    the first request for a class. `base`: the class every config dataclass derives from (it states the
    facts' defaults and the default `check`); `facts`: the class attributes of the options that `register`
    copies onto the implementation class."""

    def __init__(
        self, kind: str, config_key: str, package: str, base: type | None = None, facts: tuple[str, ...] = ()
    ):
        self.kind = kind
        self.config_key = config_key
        self.package = package
        self.base = base
        self.facts = facts
        self._configs: dict[str, type] = {}
        self._classes: dict[str, type[T]] = {}
        self._loaded = False

    def options(self, name: str) -> Callable[[type], type]:
        """Decorator of a component's config dataclass: declares `name` and its options (torch-free)."""

        def decorate(config_cls: type) -> type:
            if name in self._configs and self._configs[name] is not config_cls:
                raise RuntimeError(f"{self.kind} '{name}': options declared twice")
            default = getattr(config_cls, "name", None)
            if isinstance(default, str) and default != name:
                raise RuntimeError(f"{self.kind} '{name}': its options' `name` defaults to '{default}'")
            if self.base is not None and not issubclass(config_cls, self.base):
                raise RuntimeError(
                    f"{self.kind} '{name}': its options ({config_cls.__name__}) must derive from "
                    f"{self.base.__name__} (the facts' defaults and the default check)"
                )
            fields = (
                {f.name for f in dataclasses.fields(config_cls)}
                if dataclasses.is_dataclass(config_cls)
                else set()
            )
            for fact in self.facts:
                if fact in fields:
                    raise RuntimeError(
                        f"{self.kind} '{name}': `{fact}` is a fact of the {self.kind}, not an option: "
                        "state it as a class attribute without a type annotation"
                    )
            self._configs[name] = config_cls
            return config_cls

        return decorate

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Decorator of the implementation class of `name`, whose options are declared already: the facts
        of its options are copied onto it (a class, or an unregistered base of it, that states one itself
        is refused)."""

        def decorate(cls: type[T]) -> type[T]:
            if name not in self._configs:
                raise RuntimeError(
                    f"{self.kind} '{name}' ({_qualified(cls)}) has no options: declare its config dataclass "
                    f"with this registry's .options('{name}') in {self.package}.options"
                )
            previous = self._classes.get(name)
            if previous is not None and _qualified(previous) != _qualified(cls):  # (a re-import is not)
                raise RuntimeError(f"{self.kind} '{name}' registered twice")
            config_cls = self._configs[name]
            registered = set(self._classes.values())
            for fact in self.facts:
                stated = [k for k in cls.__mro__ if fact in vars(k) and k not in registered]
                if stated:
                    raise RuntimeError(
                        f"{self.kind} '{name}' ({_qualified(cls)}): `{fact}` is stated by "
                        f"{_qualified(stated[0])}; state it once, on its options ({config_cls.__name__}), "
                        "which register copies onto the class"
                    )
            for fact in self.facts:
                setattr(cls, fact, getattr(config_cls, fact))
            self._classes[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return decorate

    def _load(self) -> None:
        """Import every module of the implementation package (once), then check that each declared name
        has its class."""
        if self._loaded:
            return
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")  # registers its classes
        missing = sorted(set(self._configs) - set(self._classes))
        if missing:
            raise RuntimeError(
                f"{self.kind} {missing} declared with options but without a class registered "
                f"(@...register(name)) in a module of {self.package}"
            )
        self._loaded = True

    def names(self) -> list[str]:
        """The declared names, sorted (torch-free: the implementations are not imported)."""
        return sorted(self._configs)

    def config_class(self, name: str, key: str | None = None) -> type:
        """The config dataclass of `name` (torch-free); ConfigError at `key` for an unknown name."""
        if name not in self._configs:
            raise ConfigError(key or self.config_key, name, f"one of {self.names()}")
        return self._configs[name]

    def items(self) -> list[tuple[str, tuple[type[T], type]]]:
        """(name, (class, config dataclass)) of every entry, by name: what reads the registered classes'
        facts (their class attributes) iterates these."""
        self._load()
        return [(name, (self._classes[name], self._configs[name])) for name in self.names()]

    def find(self, name: str) -> type[T] | None:
        """The class registered as `name`, or None (e.g. a name from an old summary no longer registered)."""
        if name not in self._configs:
            return None
        self._load()
        return self._classes[name]

    def get(self, name: str, key: str | None = None) -> tuple[type[T], type]:
        config_cls = self.config_class(name, key)
        self._load()
        return self._classes[name], config_cls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
