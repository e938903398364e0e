"""Imports go one way: no module imports a layer above its own (ARCHITECTURE.md, "Layers").

An AST walk over the package: every ``import`` and ``from … import`` —
inside functions and under ``if TYPE_CHECKING:`` too — is checked against
the layer table below. A module may import its own layer and the layers
beneath it, never one above. A top-level module missing from the table fails
the check too, so a new package has to be placed before it can land.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import creditgate

# Top-level parts of the package, by layer (0 = the bottom). Keep in step
# with the diagram in ARCHITECTURE.md.
LAYERS: dict[str, int] = {
    # 0: what every layer may use; nothing of the domain or the web app.
    "": 0,  # the package itself (``__version__``)
    "config": 0,
    "errors": 0,
    "domain_errors": 0,
    "logs": 0,
    "metrics": 0,
    "resources": 0,
    "webkit": 0,
    # 1: the domain — money, limits, identities — and its schema.
    "ledger": 1,
    "throttle": 1,
    "auth": 1,
    "migrations": 1,
    "invalidation": 1,
    # 2: features built on the domain.
    "proxy": 2,
    "billing": 2,
    "webhooks": 2,
    "preferences": 2,
    "notify": 2,
    "retention": 2,
    # 3: the application: state, middlewares, route table, the error mapping.
    "http": 3,
    # 4: entry points.
    "cli": 4,
    "__main__": 4,
    "doctor": 4,
    "supervisor": 4,
    "embedded": 4,
}


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.imported}: {self.why}"


def _module_name(root: Path, path: Path, package: str) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement brings in (``from a import b``: ``a.b``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        here = here[: len(here) - (node.level - 1)]
        base = ".".join([*here, base] if base else here)
    # ``from creditgate import ledger`` imports the part ``ledger``; an
    # attribute (``from creditgate.ledger import Hold``) stays in its module.
    return [f"{base}.{alias.name}" for alias in node.names] if base else []


def _part(name: str, package: str) -> str | None:
    """The top-level part of ``package`` a dotted name belongs to; None if outside."""
    if name != package and not name.startswith(package + "."):
        return None
    rest = name.removeprefix(package).removeprefix(".")
    return rest.split(".", 1)[0]


def violations(root: Path, package: str, layers: dict[str, int]) -> list[Violation]:
    """Every import in the package at ``root`` that goes up the layer table."""
    found: list[Violation] = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(root, path, package)
        own = _part(module, package)
        assert own is not None
        if own not in layers:
            found.append(Violation(module, 0, module, f"{own!r} has no layer in the table"))
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in _imported(node, module, path.name == "__init__.py"):
                part = _part(name, package)
                if part is None or part == own:
                    continue
                if part not in layers:
                    # ``from creditgate import __version__``: an attribute of the package.
                    if (root / f"{part}.py").exists() or (root / part).is_dir():
                        why = f"{part!r} has no layer in the table"
                        found.append(Violation(module, node.lineno, name, why))
                    continue
                if layers[part] > layers[own]:
                    why = f"layer {layers[part]} ({part}) above layer {layers[own]} ({own})"
                    found.append(Violation(module, node.lineno, name, why))
    return found


def test_no_import_goes_up_a_layer() -> None:
    root = Path(creditgate.__file__).parent
    found = violations(root, "creditgate", LAYERS)
    assert not found, "imports going up a layer:\n" + "\n".join(map(str, found))


def test_nothing_below_http_imports_http() -> None:
    """The issue's own words, checked separately: not even under TYPE_CHECKING."""
    root = Path(creditgate.__file__).parent
    below = {part for part, layer in LAYERS.items() if layer < LAYERS["http"]}
    for path in root.rglob("*.py"):
        module = _module_name(root, path, "creditgate")
        if _part(module, "creditgate") not in below:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for name in _imported(node, module, path.name == "__init__.py"):
                    assert _part(name, "creditgate") != "http", f"{module} imports {name}"


def _plant(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "creditgate"
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_the_check_fails_on_a_planted_upward_import(tmp_path: Path) -> None:
    pkg = _plant(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "",
            "http/__init__.py": "",
            "http/state.py": "from creditgate.ledger import holds\n",  # down: fine
            "ledger/__init__.py": "from . import holds\n",
            "ledger/holds.py": (
                "from typing import TYPE_CHECKING\n"
                "from creditgate.errors import ApiError\n"  # down: fine
                "if TYPE_CHECKING:\n"
                "    from creditgate.http.state import State\n"  # up, hidden: caught
            ),
            "ledger/metering.py": "def f():\n    from ..http import state\n",  # up, relative
            "proxy/__init__.py": "from creditgate import http\n",  # up, as a part
        },
    )
    found = violations(pkg, "creditgate", LAYERS)
    assert {(v.module, v.imported) for v in found} == {
        ("creditgate.ledger.holds", "creditgate.http.state.State"),
        ("creditgate.ledger.metering", "creditgate.http.state"),
        ("creditgate.proxy", "creditgate.http"),
    }
    assert "layer 3 (http) above layer 1 (ledger)" in str(found[0])


def test_the_check_fails_on_a_module_without_a_layer(tmp_path: Path) -> None:
    pkg = _plant(
        tmp_path,
        {"__init__.py": "", "newthing.py": "", "ledger/x.py": "from creditgate import newthing\n"},
    )
    found = violations(pkg, "creditgate", LAYERS)
    assert {(v.module, v.imported) for v in found} == {
        ("creditgate.newthing", "creditgate.newthing"),
        ("creditgate.ledger.x", "creditgate.newthing"),
    }
