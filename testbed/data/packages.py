"""Where the domain sources are installed (`testbed-data`; the domains: testbed/data/corpora.py): the error
that names a missing package and the command that installs it, finding Python, npm and Debian packages and
their versions, and `Package`, one installed source as the domain table describes it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

NPM_DIR_ENV = "TESTBED_NPM_DIR"
NPM_DIR_DEFAULT = ".cache/npm/node_modules"
NPM_INSTALL = "npm install --prefix .cache/npm"
APT_INSTALL = "apt-get install"


class SourceMissingError(RuntimeError):
    """The package a domain is extracted from is not installed (or not where it was expected)."""

    def __init__(self, domain: str, looked_for: str, install: str):
        self.domain, self.looked_for, self.install = domain, looked_for, install
        super().__init__(
            f"source for domain {domain!r} not found: looked for {looked_for}. Install it with: {install}"
        )


@dataclass(frozen=True)
class Package:
    """An installed source of text: the command that installs it, how to find it for a domain (`find(domain)`:
    its path, or a `SourceMissingError` naming the domain, what was looked for and the install command) and
    its installed version (None when unknown)."""

    install: str
    find: Callable[[str], Path] = field(repr=False)
    version: Callable[[], str | None] = field(repr=False)


def pip_package(distribution: str, module: str) -> Package:
    """A PyPI distribution, found as the folder of its import package `module`."""
    install = f"pip install {distribution}"
    return Package(
        install, lambda domain: python_package_dir(domain, module, install), pip_version(distribution)
    )


def npm_package(package: str) -> Package:
    """An npm package under :func:`npm_dir`, found as its folder."""
    return Package(
        f"{NPM_INSTALL} {package}", lambda domain: npm_package_dir(domain, package), npm_version(package)
    )


def deb_package(package: str, path: Callable[[], Path]) -> Package:
    """A Debian package, found as the file or folder `path()` (a function, called when the package is looked
    for, so that a module-level location can be pointed elsewhere)."""
    install = f"{APT_INSTALL} {package}"
    return Package(install, lambda domain: require_path(domain, path(), install), deb_version(package))


# ----------------------------------------------------------------------------------------------
# Locating installed packages


def require_path(domain: str, path: Path, install: str) -> Path:
    if not path.exists():
        raise SourceMissingError(domain, str(path), install)
    return path


def python_package_dir(domain: str, package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissingError(domain, f"Python package {package!r}", install)
    return Path(next(iter(spec.submodule_search_locations)))


def npm_dir() -> Path:
    """Folder holding npm packages: ``$TESTBED_NPM_DIR`` or ``.cache/npm/node_modules``."""
    return Path(os.environ.get(NPM_DIR_ENV, NPM_DIR_DEFAULT))


def npm_package_dir(domain: str, package: str) -> Path:
    path = npm_dir() / package
    if not (path / "package.json").exists():
        raise SourceMissingError(
            domain, f"npm package {package} in {path} (set ${NPM_DIR_ENV})", f"{NPM_INSTALL} {package}"
        )
    return path


def pip_version(distribution: str) -> Callable[[], str | None]:
    def version() -> str | None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    return version


def npm_version(package: str) -> Callable[[], str | None]:
    def version() -> str | None:
        try:
            return json.loads((npm_dir() / package / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            return None

    return version


def deb_version(package: str) -> Callable[[], str | None]:
    def version() -> str | None:
        try:
            result = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
            )
        except OSError:
            return None
        return result.stdout.strip() or None

    return version
