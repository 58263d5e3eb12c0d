"""The import rule of qtk's packages (issue 22, "Structure"), read from the installed sources with ``ast``:

* ``qtk.hub`` (the client: auth, pull, cache) imports neither ``qtk.mirror`` nor ``qtk.provision``;
* ``qtk.mirror`` (the server, ``qtk serve``) may use the client's name rules and errors (``qtk.hub.names``)
  and imports no ``qtk.provision``: the provision store's view comes in through
  :class:`qtk.mirror.store.PublishedVersions`, built by the CLI;
* no import cycle among qtk's packages (``qtk.<package>``, and each top-level module on its own), nor
  among its modules;
* no module imports a ``_private`` name from another module (private modules, ``qtk._fs``, are fine:
  they are a package's own helpers, imported whole or by their public names).

Every import counts, those inside functions included (a lazy import is still an arrow); only imports
under ``if TYPE_CHECKING:`` are left out (they never run)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import qtk

PKG = Path(qtk.__file__).resolve().parent
SKIP = ("_vendor",)  # llama.cpp's converter, carried unmodified (run in a subprocess)

# Known exceptions, each with its reason; none today (the method registry sits below plan: qtk/methods.py).
# A fix that removes an entry's cause must delete the entry: the test then holds it.
KNOWN_PACKAGE_CYCLES: list = []
KNOWN_MODULE_CYCLES: list = []
KNOWN_PRIVATE_IMPORTS: list = []


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        if any(p in SKIP for p in rel.parts):
            continue
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:``."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def imports(mods=None) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """{module: the qtk modules it imports}, and every (module, from module, name) of a ``_name`` import."""
    mods = mods or _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                edges[mod] |= {a.name for a in node.names if a.name.split(".")[0] == "qtk"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: len(mod.split(".")) - (0 if is_pkg else 1)]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "qtk":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:  # `from qtk import _fs`: the module itself
                        edges[mod].add(sub)
                        continue
                    edges[mod].add(target)
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        private.append((mod, target, a.name))
    for mod in edges:
        edges[mod].discard(mod)
    return edges, private


def unit(mod: str) -> str:
    """The package a module belongs to: ``qtk.<package>``, a top-level module itself, or ``qtk``."""
    return ".".join(mod.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for a, bs in edges.items():
        g.setdefault(unit(a), set()).update(unit(b) for b in bs if unit(b) != unit(a))
    return g


def test_the_client_imports_neither_the_server_nor_provision():
    edges, _ = imports()
    bad = {(a, b) for a, bs in edges.items() if unit(a) == "qtk.hub" for b in bs
           if unit(b) in ("qtk.mirror", "qtk.provision")}
    assert not bad, f"qtk.hub must not import the mirror or provision: {sorted(bad)}"


def test_the_mirror_imports_no_provision_and_only_the_clients_rules():
    edges, _ = imports()
    mirror = {(a, b) for a, bs in edges.items() if unit(a) == "qtk.mirror" for b in bs if unit(b) != "qtk.mirror"}
    assert not {(a, b) for a, b in mirror if unit(b) == "qtk.provision"}, sorted(mirror)
    assert {b for _a, b in mirror if unit(b) == "qtk.hub"} <= {"qtk.hub.names"}, sorted(mirror)


def test_no_import_cycle_among_packages_or_modules():
    edges, _ = imports()
    found = cycles(package_graph(edges))
    assert all(c in KNOWN_PACKAGE_CYCLES for c in found), f"package cycles: {found}"
    module_cycles = cycles(edges)
    assert all(c in KNOWN_MODULE_CYCLES for c in module_cycles), f"module cycles: {module_cycles}"
    # a known cycle that is gone must leave the list, so that it cannot come back unnoticed
    assert all(c in found for c in KNOWN_PACKAGE_CYCLES) and all(c in module_cycles for c in KNOWN_MODULE_CYCLES), \
        "a known cycle was removed: delete it from KNOWN_*_CYCLES"


def test_no_module_imports_a_private_name_of_another():
    _, private = imports()
    assert set(private) <= set(KNOWN_PRIVATE_IMPORTS), sorted(set(private) - set(KNOWN_PRIVATE_IMPORTS))


def test_the_checks_see_what_they_look_for(tmp_path):
    """The walker on a made-up package: a lazy import, a relative one, a private name, a cycle, and a
    TYPE_CHECKING import that is left out."""
    pkg = tmp_path / "qtk"
    (pkg / "hub").mkdir(parents=True)
    (pkg / "mirror").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "hub" / "__init__.py").write_text("")
    (pkg / "hub" / "names.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..mirror import app\n"
        "def f():\n    from ..mirror.app import _secret\n")
    (pkg / "mirror" / "__init__.py").write_text("")
    (pkg / "mirror" / "app.py").write_text("from ..hub import names\n_secret = 1\n")
    mods = {}
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(tmp_path).with_suffix("")
        is_pkg = rel.name == "__init__"
        mods[".".join(rel.parts[:-1] if is_pkg else rel.parts)] = (path, is_pkg)
    edges, private = imports(mods)
    assert edges["qtk.hub.names"] == {"qtk.mirror.app"} and edges["qtk.mirror.app"] == {"qtk.hub.names"}
    assert private == [("qtk.hub.names", "qtk.mirror.app", "_secret")]
    assert cycles(edges) == [{"qtk.hub.names", "qtk.mirror.app"}]
    assert cycles(package_graph(edges)) == [{"qtk.hub", "qtk.mirror"}]


def test_qtk_serve_passes_the_provision_stores_view_in(qtk, tmp_path):
    """The CLI builds the store view (the mirror does not import provision): `qtk serve --index` over a
    provision store hashes the files of every version the store keeps, not only the published one."""
    from qtk.provision.store import ProvisionStore

    ps = ProvisionStore(tmp_path / "store")
    ps.init()
    for key, previous, content in (("k1", None, b"one"), ("k2", "k1", b"two")):
        build = ps.builds / key
        build.mkdir(parents=True)
        (build / "model.safetensors").write_bytes(content * 1000)
        ps.publish("qtk/m-nf4", key, build, {"qtk_provision.json": json.dumps({"key": key})})
        ps.write_json(ps.record_path("qtk/m-nf4"), {"repo_id": "qtk/m-nf4", "published": {"key": key},
                                                    "previous": previous})
    r = qtk("serve", str(ps.root), "--index")
    assert r.exit_code == 0, r.stderr
    assert "Indexed 1 repo(s), 4 file(s)" in r.stderr, r.stderr  # two files in each of the two kept versions


def _long_functions(limit: int = 60) -> list[str]:
    """Functions whose code (the docstring aside: a command's docstring is its --help page) is over
    ``limit`` lines and whose docstring does not say why ("Long because ...")."""
    out = []
    for name, (path, _is_pkg) in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node) or ""
            body = node.body[1:] if doc and len(node.body) > 1 else node.body
            if node.end_lineno - body[0].lineno + 1 > limit and "long because" not in doc.lower():
                out.append(f"{name}.{node.name} ({node.end_lineno - body[0].lineno + 1} lines)")
    return out


def test_no_function_over_60_lines_without_a_reason():
    assert _long_functions() == []
