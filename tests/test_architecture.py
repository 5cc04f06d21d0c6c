"""The package's layering (docs/architecture.md, "Layers"): the import-linter contracts of pyproject.toml
hold, and no function imports a testbed module (every dependency between modules is visible at the top of
a file)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "testbed"


def test_import_contracts_are_kept():
    """Layers, train never importing analysis, routing never importing losses, no cycles (`lint-imports`)."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return ["." * node.level + (node.module or "")]


def function_level_testbed_imports(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line in function: import` for every import of a testbed module (or a relative one) inside a
    function body, at any depth (under if/try/with too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            modules = imported_modules(node)
            if any(m == "testbed" or m.startswith(("testbed.", ".")) for m in modules):
                where = f"{path.relative_to(root)}:{node.lineno} in {function.name}()"
                found.append(f"{where}: {ast.unparse(node)}")
    return found


# The modules allowed to defer their imports of the package: testbed-train's entry point and its sweep
# pre-check answer --help and config errors before they import torch, Lightning and the training stack.
DEFERRED_IMPORTS = {"testbed/train/cli.py", "testbed/train/sweeps.py"}


def test_no_function_level_imports_of_testbed_modules():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50
    hits = {hit for path in files for hit in function_level_testbed_imports(path)}
    offenders = sorted(hit for hit in hits if hit.split(":")[0] not in DEFERRED_IMPORTS)
    assert not offenders, "move these imports to the top of their modules:\n" + "\n".join(offenders)
    assert {hit.split(":")[0] for hit in hits} <= DEFERRED_IMPORTS


def test_the_check_finds_a_function_level_import(tmp_path):
    """The AST check itself: an import nested in a function (under `if`) is found, a module-level one not."""
    source = tmp_path / "example.py"
    source.write_text(
        "import testbed.config\n\n\ndef f(flag):\n    if flag:\n        from testbed.errors import X\n"
    )
    hits = function_level_testbed_imports(source, root=tmp_path)
    assert hits == ["example.py:6 in f(): from testbed.errors import X"]
