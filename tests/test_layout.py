"""The package's layering (BUILD_NOTES, module map): imports point down only, with no cycle."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lwjax"
# Lower layers first; a module may import its own layer and those before it, never one after.
LAYERS = [
    {"lwjax.files", "lwjax.config", "lwjax.mri"},
    {"lwjax.data"},
    {"lwjax.nets", "lwjax.metrics", "lwjax.stages", "lwjax.training"},
    {"lwjax.models", "lwjax.figures", "lwjax.console", "lwjax.tensorboard"},
    {"lwjax.experiment"},
    {"lwjax.report"},
    {"lwjax.evaluate", "lwjax.memory", "lwjax.inference", "lwjax.interpret", "lwjax.cli"},
]


def _name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
  """``{module: lwjax modules it imports}``, a ``from X import y`` counted as X.y when that is a
  module of the package."""
  modules = {_name(p): p for p in PACKAGE.rglob("*.py")}
  out = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lwjax"):
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          deps.add(full if full in modules else node.module)
      elif isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name.startswith("lwjax")}
    out[name] = deps - {name}
  return out


def _layer(module: str) -> int:
  for i, layer in enumerate(LAYERS):
    if any(module == top or module.startswith(top + ".") for top in layer):
      return i
  raise AssertionError(f"{module} is in no layer of this test: add it to LAYERS")


def test_every_import_points_down():
  upward = [f"{m} -> {d}" for m, deps in _imports().items() if m != "lwjax"
            for d in deps if d != "lwjax" and _layer(d) > _layer(m)]
  assert not upward, upward


def test_no_import_cycle():
  graph = _imports()
  state: dict[str, int] = {}

  def visit(module, path):
    state[module] = 1
    for dep in graph.get(module, ()):
      if state.get(dep) == 1:
        pytest.fail(f"import cycle: {' -> '.join(path[path.index(dep):] + [dep])}")
      if dep in graph and not state.get(dep):
        visit(dep, path + [dep])
    state[module] = 2

  for module in graph:
    if not state.get(module):
      visit(module, [module])


def test_the_model_is_read_in_one_place():
  # --model picks a family in models/__init__.py; config validates the flag; nothing else tests it.
  test = re.compile(r"cfg\.model\s*(==|!=|\bin\b|\])")
  readers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if test.search(p.read_text()))
  assert readers == ["config.py", "models/__init__.py"], readers
