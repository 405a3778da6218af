"""The package's module layout: no import cycles, every module imports on its own, and the old module names
(``hmn.training``, ``hmn.bundles``) are re-export shims that bundles packed before the split still load through.

The import graph is read from the source (``hmn/``, and ``transforms/`` as ``hmn.transforms``): an edge ``a -> b``
for each ``import hmn...`` / ``from hmn... import ...`` / relative import in module ``a`` naming module ``b``
(``from p import m`` names the submodule ``p.m`` where there is one, else ``p``). Importing a submodule runs its
package's ``__init__`` too; that implicit edge is not counted, or every package re-exporting its modules would be
a cycle.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIMS = {"hmn.training": "hmn.workflows", "hmn.bundles": "hmn.bundle"}
# names the bundles' configs use that came after the split (no bundle packed before it can name them)
NAMED_SINCE_THE_SPLIT = {"TrainingRun", "tracking", "ProgressLog", "ResumableSampler", "worker_ignores_stop_signals",
                         "bundle_name", "bundle_version"}


def _modules(root: Path) -> dict[str, Path]:
    """Module name -> source file of every module under ``root/hmn`` and ``root/transforms`` (as hmn.transforms)."""
    out = {}
    for folder, package in (("hmn", "hmn"), ("transforms", "hmn.transforms")):
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _import_graph(root: Path, top_level_only: bool) -> dict[str, set[str]]:
    """``{module: modules it imports}``; with `top_level_only`, only the module-level statements (not those inside
    functions, classes or ``if`` blocks)."""
    modules = _modules(root)

    def known(name: str) -> str | None:  # the module itself, or the nearest enclosing package that exists
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in tree.body if top_level_only else ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            graph[module] |= {t for t in map(known, targets) if t is not None and t != module}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as ``[a, b, ..., a]``, or None when it has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_on_hand_made_graphs():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"x": {"y"}, "y": {"y2", "z"}, "z": {"y"}, "y2": set()}) == ["y", "z", "y"]


def test_the_import_graph_reads_each_import_form(tmp_path):
    files = {
        "hmn/__init__.py": "",
        "hmn/a.py": "import hmn.p.q\nfrom hmn import b\nfrom hmn.p import C\n\ndef f():\n    from hmn.c import x\n",
        "hmn/b.py": "from hmn import __version__\nimport os\n",
        "hmn/c.py": "",
        "hmn/p/__init__.py": "from .q import C\nfrom . import r\n",
        "hmn/p/q.py": "from ..c import y\nif True:\n    import hmn.b\n",
        "hmn/p/r.py": "",
        "transforms/__init__.py": "from .t import T\n",
        "transforms/t.py": "from hmn.p import q\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    top = _import_graph(tmp_path, top_level_only=True)
    assert top == {"hmn": set(), "hmn.a": {"hmn.p.q", "hmn.b", "hmn.p"}, "hmn.b": {"hmn"}, "hmn.c": set(),
                   "hmn.p": {"hmn.p.q", "hmn.p.r"}, "hmn.p.q": {"hmn.c"}, "hmn.p.r": set(),
                   "hmn.transforms": {"hmn.transforms.t"}, "hmn.transforms.t": {"hmn.p.q"}}
    every = _import_graph(tmp_path, top_level_only=False)
    assert every["hmn.a"] == top["hmn.a"] | {"hmn.c"} and every["hmn.p.q"] == {"hmn.c", "hmn.b"}


def test_no_import_cycle_among_module_level_imports():
    cycle = _find_cycle(_import_graph(ROOT, top_level_only=True))
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_even_through_imports_inside_functions():
    # an import deferred into a function hides a cycle from the import system but not from a reader: the
    # modules still depend on each other (hmn.bundles <-> hmn.bundle_docs, metrics <-> calibration were such)
    cycle = _find_cycle(_import_graph(ROOT, top_level_only=False))
    assert cycle is None, "import cycle (through an import inside a function): " + " -> ".join(cycle)


@pytest.mark.parametrize("shim", sorted(SHIMS))
def test_the_compatibility_shims_only_re_export(shim):
    path = ROOT / (shim.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defined = [f"{type(n).__name__} {getattr(n, 'name', '')} (line {n.lineno})" for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))]
    assert not defined, f"{path} defines {len(defined)}: {defined[:6]}...; it may only re-export names of {SHIMS[shim]}"
    docstring, *rest = tree.body
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    other = [f"{type(n).__name__} (line {n.lineno})" for n in rest
             if not (isinstance(n, ast.ImportFrom) and (n.module or "").startswith(SHIMS[shim]))]
    assert not other, f"{path} holds more than imports from {SHIMS[shim]}: {other}"


def test_bundles_packed_before_the_split_find_every_name_under_the_old_modules():
    import importlib

    from monai.bundle import ConfigParser

    # the configs were only renamed by the split: an older packed bundle names these same attributes under the old
    # modules (hmn.training.X for hmn.workflows.X, hmn.bundles.X for hmn.bundle.X)
    text = "".join(p.read_text() for p in sorted(ROOT.glob("bundles/*/configs/*.json")))
    for old, new in SHIMS.items():
        names = set(re.findall(rf"\b{re.escape(new)}\.(\w+)", text)) - NAMED_SINCE_THE_SPLIT
        assert names, f"the bundles name nothing of {new}"
        old_module, new_module = importlib.import_module(old), importlib.import_module(new)
        missing = sorted(n for n in names if getattr(old_module, n, None) is not getattr(new_module, n))
        assert not missing, f"{old} lacks {missing}, which bundles packed before the split name"
    # and such a config still parses and builds through MONAI's own parser
    config = {
        "imports": ["$import hmn", "$import hmn.training", "$import hmn.bundles"],
        "resume": "$hmn.training.as_bool('yes')",
        "loss": {"_target_": "hmn.training.EpochLoss"},
        "summary": "$hmn.bundles.error_summary(ValueError('x'))",
    }
    parser = ConfigParser(json.loads(json.dumps(config)))
    assert parser.get_parsed_content("resume") is True
    assert type(parser.get_parsed_content("loss")).__module__ == "hmn.workflows.history"
    assert parser.get_parsed_content("summary") is None  # raised outside the project: no summary line


@pytest.mark.slow  # a fresh interpreter imports torch and MONAI each time: about 6 s per module on 2 cores
@pytest.mark.parametrize("module", sorted(_modules(ROOT)))
def test_every_module_imports_alone_in_a_fresh_process(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"`import {module}` fails in a fresh interpreter:\n{proc.stderr[-3000:]}"
