"""The registries (testbed/registry.py): names and options without the implementations, the classes found on
the first request for one, and a name with options but no class (or a class without options) an error; the
facts stated once, on the options, and copied onto the class (a class that states one itself refused)."""

from __future__ import annotations

import dataclasses
import importlib
import sys

import pytest

from testbed.errors import ConfigError
from testbed.losses import AUX_LOSSES, BALANCE
from testbed.registry import Registry
from testbed.routing import ROUTERS

OPTIONS_PY = """
from dataclasses import dataclass

from testbed.registry import Registry

THINGS = Registry("thing", "thing", "{package}")


@THINGS.options("one")
@dataclass
class OneConfig:
    name: str = "one"


@THINGS.options("two")
@dataclass
class TwoConfig:
    name: str = "two"
"""

IMPLEMENTATION_PY = """
from {package}.options import THINGS


@THINGS.register("one")
class One:
    pass
"""


@pytest.fixture
def package(tmp_path, monkeypatch, request):
    """A throwaway package: options for `one` and `two`, a class for `one` only."""
    name = f"registry_probe_{request.node.name.replace('[', '_').replace(']', '_')}"
    folder = tmp_path / name
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "options.py").write_text(OPTIONS_PY.format(package=name))
    (folder / "implementation.py").write_text(IMPLEMENTATION_PY.format(package=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[module]


def test_names_and_options_come_without_the_implementations(package):
    things = importlib.import_module(f"{package}.options").THINGS
    assert things.names() == ["one", "two"]
    assert things.config_class("two")().name == "two"
    with pytest.raises(ConfigError, match="one of \\['one', 'two'\\]"):
        things.config_class("three", "thing.name")
    assert f"{package}.implementation" not in sys.modules


def test_options_without_a_class_are_an_error(package):
    things = importlib.import_module(f"{package}.options").THINGS
    with pytest.raises(RuntimeError, match=r"thing \['two'\] declared with options but without a class"):
        things.get("one")
    assert f"{package}.implementation" in sys.modules  # the package's modules were imported to look


def test_a_class_without_options_is_an_error(package):
    things = importlib.import_module(f"{package}.options").THINGS
    with pytest.raises(RuntimeError, match="thing 'three' .* has no options"):
        things.register("three")(type("Three", (), {}))


def test_a_name_default_other_than_the_registered_name_is_an_error(package):
    things = importlib.import_module(f"{package}.options").THINGS
    config_cls = type("Config", (), {"name": "other"})
    with pytest.raises(RuntimeError, match="thing 'four': its options' `name` defaults to 'other'"):
        things.options("four")(config_cls)


@pytest.mark.parametrize("registry", [ROUTERS, BALANCE, AUX_LOSSES], ids=lambda r: r.config_key)
def test_every_shipped_name_has_its_class_and_options(registry):
    """Every declared name has a class (items() checks it) registered under that name."""
    items = registry.items()
    assert [name for name, _ in items] == registry.names()
    for name, (cls, config_cls) in items:
        assert cls.registry_name == name and registry.config_class(name) is config_cls
        assert registry.get(name) == (cls, config_cls) and registry.find(name) is cls
    assert registry.find("no_such_name") is None


class Options:
    """A registry's options base: the facts' defaults."""

    shared: bool = False


def facts_registry() -> Registry:
    """A registry with one fact (`shared`) and the options of `plain` and `special` (shared = True)."""
    things = Registry("thing", "thing", "no_such_package", base=Options, facts=("shared",))
    things.options("plain")(dataclasses.make_dataclass("PlainConfig", [("size", int, 1)], bases=(Options,)))
    special = dataclasses.make_dataclass("SpecialConfig", [("size", int, 1)], bases=(Options,))
    special.shared = True
    things.options("special")(special)
    return things


def test_register_copies_the_facts_of_the_options_onto_the_class():
    things = facts_registry()
    plain, special = (
        things.register("plain")(type("Plain", (), {})),
        things.register("special")(type("Special", (), {})),
    )
    assert (plain.shared, special.shared) == (False, True)
    # a subclass of a registered class is not refused for the facts its base got copied
    assert things.register("plain")(type("Plain", (plain,), {})).shared is False


def test_a_class_that_states_a_fact_itself_is_refused():
    """Each fact is stated once, on the options: the class (or a base of it) stating one is an error."""
    things = facts_registry()
    with pytest.raises(
        RuntimeError, match=r"thing 'special' .*`shared` is stated by .*Special; state it once"
    ):
        things.register("special")(type("Special", (), {"shared": True}))
    base = type("Base", (), {"shared": False})
    with pytest.raises(RuntimeError, match="`shared` is stated by .*Base"):
        things.register("plain")(type("Plain", (base,), {}))


def test_options_that_miss_the_base_or_hold_a_fact_as_an_option_are_refused():
    things = facts_registry()
    with pytest.raises(
        RuntimeError, match=r"thing 'other': its options \(OtherConfig\) must derive from Options"
    ):
        things.options("other")(dataclasses.make_dataclass("OtherConfig", [("size", int, 1)]))
    as_field = dataclasses.make_dataclass("FieldConfig", [("shared", bool, True)], bases=(Options,))
    with pytest.raises(RuntimeError, match="thing 'field': `shared` is a fact of the thing, not an option"):
        things.options("field")(as_field)
