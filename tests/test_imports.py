"""The package's import graph has no cycle, lazy (function-level) imports too.

A function-level import hides a cycle from Python but not from the design: the
lower module still depends on the higher one. The graph here is parsed with
`ast` (nothing is imported): a fraction of a second.

Edges are the modules each statement names: `import mmal_jax.a.b` and
`from mmal_jax.a import b` (b a submodule) give an edge to `mmal_jax.a.b`;
`from mmal_jax.a import name` (name not a submodule) gives an edge to
`mmal_jax.a`. Relative imports are resolved. The parent packages Python runs
on the way (`mmal_jax/a/__init__.py` for `mmal_jax.a.b`) are not edges: a
package's `__init__` gathers its submodules' public names, and counting it
would make every submodule that imports a sibling part of a cycle.
"""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parents[1] / "mmal_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(name: str, is_package: bool, source: str,
                     modules) -> set[str]:
  """The modules of `modules` that module `name`'s import statements name, at
  any depth (functions too); `name` itself excluded."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      module = node.module
      if node.level:  # Relative: a package is its own level-1 parent.
        base = name.split(".")
        base = base[:len(base) - node.level + is_package]
        module = ".".join(base + ([module] if module else []))
      for alias in node.names:
        sub = f"{module}.{alias.name}"
        found.add(sub if sub in modules else module)
  unknown = {m for m in found
             if m.split(".")[0] == "mmal_jax" and m not in modules}
  assert not unknown, f"{name} imports missing modules {sorted(unknown)}"
  return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
  """{module: the mmal_jax modules it imports} for every module of the
  package. Cost: one parse of each file (~0.3 s)."""
  modules = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
  return {name: imported_modules(name, path.name == "__init__.py",
                                 path.read_text(), modules)
          for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (a -> ... -> a) for each strongly connected component."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v):  # Tarjan's; recursion no deeper than the ~90 modules.
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(component)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  cycles = []
  for component in components:  # A shortest way back to its first module.
    start = min(component)
    paths, frontier = {start: [start]}, [start]
    while start not in graph[frontier[0]]:  # A cycle exists: this ends.
      v = frontier.pop(0)
      for w in sorted(graph[v] & component):
        if w not in paths:
          paths[w] = paths[v] + [w]
          frontier.append(w)
    cycles.append(paths[frontier[0]] + [start])
  return cycles


def test_the_graph_finds_every_import_form():
  graph = import_graph()
  # Top-level, `from package import submodule`, and function-level imports.
  assert "mmal_jax.fs" in graph["mmal_jax"]
  assert "mmal_jax.acquisition.layout" in graph["mmal_jax.acquisition.kernels"]
  assert "mmal_jax.config_lib" in graph["mmal_jax.sweep"]  # Inside a function.
  modules = {"mmal_jax", "mmal_jax.a", "mmal_jax.a.b", "mmal_jax.a.c",
             "mmal_jax.d"}
  source = ("import os\nfrom . import c\nfrom .. import d\n"
            "def f():\n  from mmal_jax.a import NAME\n")
  assert imported_modules("mmal_jax.a.b", False, source, modules) == {
      "mmal_jax.a.c", "mmal_jax.d", "mmal_jax.a"}
  assert imported_modules("mmal_jax.a", True, "from .c import x\n",
                          modules) == {"mmal_jax.a.c"}
  assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
      ["a", "b", "c", "a"]]
  assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
  cycles = find_cycles(import_graph())
  assert not cycles, "import cycles:\n" + "\n".join(
      " -> ".join(c) for c in cycles)
