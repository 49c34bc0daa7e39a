"""Structure rules of the package, read from its source: no import cycle, collectives only in backends/,
and no builtin exception raised where a ShardshapError belongs."""
import ast
import pathlib
import re

import shardshap
from shardshap import errors

ROOT = pathlib.Path(shardshap.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """Package modules `name` imports, at load time or lazily inside a function (a lazy import that closes
    a cycle only hides it)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            submodules = {f"{target}.{a.name}" for a in node.names} & modules.keys()
            out |= submodules or ({target} & modules.keys())
            if submodules and len(submodules) < len(node.names):
                out |= {target} & modules.keys()  # names that live in the package itself
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names} & modules.keys()
    return out - {name}


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, f, modules) for m, f in modules.items()}
    assert sum(map(len, graph.values())) > 50  # the scan sees the package's imports
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_collectives_only_in_backends():
    pattern = re.compile(r"dist\.(all_reduce|barrier|all_gather|broadcast|reduce_scatter|all_to_all|send|recv)\b")
    found = [f"{f.relative_to(ROOT)}:{i}" for f in ROOT.rglob("*.py") if f.parent.name != "backends"
             for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, f"collectives outside shardshap/backends/: {found}"


BUILTINS = {"ValueError", "TypeError", "RuntimeError", "NotImplementedError", "KeyError", "Exception",
            "AssertionError", "OSError", "IOError", "ZeroDivisionError"}
# methods of abstract interfaces may raise NotImplementedError to mark what a subclass must provide
ALLOWED = {("optim/base.py", "NotImplementedError")}


def test_no_builtin_exception_raised():
    found = []
    for f in ROOT.rglob("*.py"):
        rel = str(f.relative_to(ROOT))
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) \
                    and isinstance(node.exc.func, ast.Name) and node.exc.func.id in BUILTINS \
                    and (rel, node.exc.func.id) not in ALLOWED:
                found.append(f"{rel}:{node.lineno} {node.exc.func.id}")
    assert not found, f"raise a shardshap.errors class (it also subclasses the builtin): {found}"


def test_error_classes_share_the_root_and_keep_their_builtins():
    classes = [getattr(errors, n) for n in errors.__all__]
    assert all(issubclass(c, errors.ShardshapError) for c in classes)
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.UnsupportedModule, TypeError)
    assert issubclass(errors.BatchShapeError, errors.AttributionError)
    assert issubclass(errors.StaleTotalsError, errors.StoreError)
    for name in ("AttributionError", "ConfigError", "ShardshapError", "StoreError", "UnsupportedEngine"):
        assert getattr(shardshap, name) is getattr(errors, name)
