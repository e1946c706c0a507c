"""The package's shape: no import cycle anywhere in structlik/ (imports inside functions and
importlib.import_module of a literal name count too), and every structlik.ops submodule reachable
by its name (no public function of the same name shadows it)."""
import ast
import importlib
import pathlib
import types

import structlik
import structlik.ops

ROOT = pathlib.Path(structlik.__file__).parent


def modules():
    """{module name: source path} for every module of the package."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("structlik",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name, path, known):
    """The package modules ``name`` imports, anywhere in its code. ``from . import a`` is an edge to
    ``a`` alone; importing ``p.q.r`` also runs ``p.q``'s __init__ (an edge, unless ``name`` is inside it)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{node.module}" if node.module else parent
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            found |= set(subs) if len(subs) == len(node.names) else {base, *subs}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args
              and isinstance(node.args[0], (ast.Constant, ast.JoinedStr))):
            arg = node.args[0]
            text = arg.value if isinstance(arg, ast.Constant) else "".join(
                v.value for v in arg.values if isinstance(v, ast.Constant))
            found |= {m for m in known if m == text or m.startswith(text.rstrip("."))}
    for dep in list(found):
        parent = dep.rsplit(".", 1)[0]
        while parent.count(".") >= 1 and not name.startswith(parent):   # subpackages' __init__, not the root's
            found.add(parent)
            parent = parent.rsplit(".", 1)[0]
    return {d for d in found if d in known and d != name}


def test_no_import_cycle():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    state, cycles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(trail[trail.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = "done"
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_every_ops_submodule_is_reachable_by_its_name():
    for path in (ROOT / "ops").glob("*.py"):
        if path.name == "__init__.py":
            continue
        name = f"structlik.ops.{path.stem}"
        module = importlib.import_module(name)
        assert isinstance(module, types.ModuleType) and module.__name__ == name
        assert getattr(structlik.ops, path.stem) is module, f"structlik.ops.{path.stem} is not its module"
    # the public functions keep their names
    assert callable(structlik.ops.nll) and callable(structlik.ops.nll_basis) and callable(structlik.ops.apply_upper)
