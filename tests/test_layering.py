"""One direction of dependencies (ARCHITECTURE.md): a module imports only from its own
layer or lower ones, at module level, lazily, or under TYPE_CHECKING alike. Parsed from
the source, so an import nobody runs still counts."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "loadfsm"

# Lowest first. A module is named by its dotted path under loadfsm; a package entry
# covers every module in it.
LAYERS = [
    ("core", {"states", "errors", "pieces", "layer", "plan", "ledger", "report", "trace",
              "atomic", "profiling", "watchdog"}),
    ("handlers and quant", {"quant", "handlers"}),
    ("sources", {"sources"}),
    ("loading", {"loading"}),
    ("reload", {"reload"}),
    ("integrations", {"integrations"}),
    ("testing", {"testing"}),        # reference models and checkpoint writers; the demo uses them
    ("verbs and CLI", {"__init__", "__main__", "api", "hf", "session", "sync", "cli", "demo",
                       "plan_cli", "trace_timeline", "trace_summary", "trace_export",
                       "trace_plot"}),
]


def _layer_of(module: str) -> int:
    """The layer index of ``module`` (dotted, relative to the package)."""
    parts = module.split(".")
    for depth in (1, 2):
        for index, (_, members) in enumerate(LAYERS):
            if ".".join(parts[:depth]) in members:
                return index
    raise AssertionError(f"loadfsm.{module} is in no layer of the table: add it")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1] + ["__init__"]
        yield ".".join(parts), path


def _imports(module: str, path: Path):
    """Every loadfsm module ``path`` imports, wherever the import statement sits."""
    package = module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.split(".")[0] == "loadfsm":
                target = node.module.partition(".")[2]
            else:
                continue
            yield target if node.module else f"{target}.{node.names[0].name}".lstrip(".")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "loadfsm" and "." in alias.name:
                    yield alias.name.partition(".")[2]


def _home(module: str) -> str:
    """The layer-table name of an imported target (``handlers.base`` -> ``handlers``)."""
    return module if module else "__init__"


def test_every_module_is_in_a_layer():
    for module, _ in _modules():
        _layer_of(_home(module))


@pytest.mark.parametrize("module, path", list(_modules()), ids=lambda v: str(v))
def test_no_module_imports_a_higher_layer(module, path):
    own = _layer_of(module)
    upward = [(target, LAYERS[_layer_of(target)][0]) for target in _imports(module, path)
              if _layer_of(target) > own]
    assert not upward, (f"loadfsm.{module} ({LAYERS[own][0]}) imports a higher layer: "
                        f"{upward}")


def test_the_checker_sees_lazy_and_type_checking_imports(tmp_path):
    """The parse finds imports inside functions and ``if TYPE_CHECKING`` blocks."""
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from ..sync import WeightSync\n"
                      "def f():\n    from ..integrations import engine\n")
    assert set(_imports("handlers.m", source)) == {"sync", "integrations"}
