"""The structure the design asks for: the library never imports a higher layer, even inside a
function, and no two library modules import each other."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIGHER = ("data_gen", "experiments", "benchmarks", "tpu", "tests")


def _modules(package: str) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(os.path.join(ROOT, package)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


def _runtime_nodes(tree: ast.AST):
  """Every node except those under `if TYPE_CHECKING:` (annotations only; never executed)."""
  stack = [tree]
  while stack:
    node = stack.pop()
    yield node
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
        stack.extend(child.orelse)
        continue
      stack.append(child)


def _imports(path: str, module: str) -> set[str]:
  """Every module an import statement names (function-level ones included), relative ones resolved."""
  names = set()
  for node in _runtime_nodes(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".")[:-node.level] if not path.endswith("__init__.py") else \
            module.split(".")[:len(module.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      names.add(base)
      names |= {f"{base}.{a.name}" for a in node.names}
  return names


def test_the_library_never_imports_a_higher_layer():
  bad = []
  for name, path in _modules("autotraj_jax").items():
    for imported in _imports(path, name):
      if imported.split(".")[0] in HIGHER:
        bad.append(f"{name} imports {imported}")
  assert not bad, bad


def test_no_import_cycle_between_library_modules():
  mods = _modules("autotraj_jax")
  graph = {}
  for name, path in mods.items():
    deps = set()
    for imported in _imports(path, name):
      while imported and imported not in mods:  # `from pkg.mod import fn` -> pkg.mod
        imported = imported.rpartition(".")[0]
      if imported and imported != name and not name.startswith(imported + "."):  # a package's own __init__
        deps.add(imported)
    graph[name] = deps
  seen, on_stack, cycles = set(), [], []

  def visit(n):
    if n in on_stack:
      cycles.append(on_stack[on_stack.index(n):] + [n])
      return
    if n in seen:
      return
    seen.add(n)
    on_stack.append(n)
    for d in sorted(graph.get(n, ())):
      visit(d)
    on_stack.pop()

  for n in sorted(graph):
    visit(n)
  assert not cycles, cycles[:5]


def test_stage_one_depends_on_the_library_only_downward():
  for name, path in _modules("data_gen").items():
    for imported in _imports(path, name):
      assert imported.split(".")[0] not in ("experiments", "benchmarks"), (name, imported)
