"""The habits that keep the code readable, checked rather than remembered.

* ruff, configured in pyproject.toml, is clean on spade_jax/, experiments/, tests/;
* import-linter's contracts (pyproject.toml) hold: the pipeline's stages import only
  downward, and within a stage the public entry points sit above the single-device
  and sharded forms they choose between;
* no import cycle in spade_jax, counting imports inside functions (grimp's graph,
  strongly connected components);
* no source file in spade_jax/ or experiments/ over 600 lines;
* every test listed in tests/slow_tests.txt exists.
"""

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 600


def test_ruff_is_clean():
  proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                         "spade_jax", "experiments", "tests", "setup.py"],
                        cwd=REPO, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


def test_import_linter_contracts_hold():
  proc = subprocess.run([sys.executable, "-c",
                         "import sys; from importlinter.cli import lint_imports_command; "
                         "sys.argv = ['lint-imports', '--config', 'pyproject.toml', "
                         "'--no-cache']; lint_imports_command()"],
                        cwd=REPO, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
  assert "broken" in proc.stdout and "0 broken" in proc.stdout, proc.stdout[-3000:]


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan, iterative)."""
  adjacency = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
  index, low, on_stack, stack, found = {}, {}, set(), [], []
  for root in sorted(adjacency):
    if root in index:
      continue
    work = [(root, iter(adjacency[root]))]
    index[root] = low[root] = len(index)
    stack.append(root)
    on_stack.add(root)
    while work:
      node, edges = work[-1]
      for nxt in edges:
        if nxt not in index:
          index[nxt] = low[nxt] = len(index)
          stack.append(nxt)
          on_stack.add(nxt)
          work.append((nxt, iter(adjacency[nxt])))
          break
        if nxt in on_stack:
          low[node] = min(low[node], index[nxt])
      else:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
          component = []
          while True:
            member = stack.pop()
            on_stack.discard(member)
            component.append(member)
            if member == node:
              break
          if len(component) > 1:
            found.append(sorted(component))
  return found


def test_no_import_cycles():
  grimp = pytest.importorskip("grimp")
  graph = grimp.build_graph("spade_jax", include_external_packages=False)
  assert len(graph.modules) > 30  # The whole package was found.
  assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
  class Graph:  # a -> b -> c -> a, d -> a.
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    modules = set(edges)

    def find_modules_directly_imported_by(self, m):
      return self.edges[m]

  assert _cycles(Graph()) == [["a", "b", "c"]]


def test_no_source_file_over_600_lines():
  long = {}
  for folder in ("spade_jax", "experiments"):
    for path in (REPO / folder).rglob("*"):
      if path.suffix in (".py", ".cc") and path.is_file():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
          long[str(path.relative_to(REPO))] = lines
  assert long == {}, f"split these by job: {long}"


def test_slow_tests_list_names_existing_tests():
  """Every id in tests/slow_tests.txt names a test function of its file, so a renamed or
  removed test does not silently fall out of the tier list."""
  listed = [line.strip() for line in
            (REPO / "tests" / "slow_tests.txt").read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]
  assert listed and len(listed) == len(set(listed))
  missing = []
  for nodeid in listed:
    path, _, name = nodeid.partition("::")
    source = REPO / path
    function = name.split("[", 1)[0]
    if not source.is_file() or f"\ndef {function}(" not in source.read_text(encoding="utf-8"):
      missing.append(nodeid)
  assert not missing, missing
