"""No two modules under utils/ import each other, counting imports inside functions.

    python tests/test_utils_imports.py    # prints each module's utils imports and any pair that imports both ways
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names(root, package="utils"):
    """Dotted module name -> file, for every .py file of the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted((Path(root) / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(path, name, modules):
    """The package's modules that one file imports anywhere in it (top level, functions, branches)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x`, `from ..data import imageio`
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # `from utils.data import imageio` names a module; `from utils.config import load_config` a member
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
    return {module for module in found if module in modules and module != name}


def import_graph(root, package="utils"):
    modules = module_names(root, package)
    return {name: imported_modules(path, name, modules) for name, path in modules.items()}


def mutual_imports(graph):
    return sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, ())})


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path):
    package = tmp_path / "utils"
    (package / "group").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "group" / "__init__.py").write_text("")
    (package / "alpha.py").write_text("def late():\n    from utils.group import beta\n    return beta\n")
    (package / "group" / "beta.py").write_text("from ..alpha import late\n")
    (package / "group" / "gamma.py").write_text("import utils.alpha\nfrom . import beta\n")
    graph = import_graph(tmp_path)
    assert graph["utils.alpha"] == {"utils.group.beta"}
    assert graph["utils.group.beta"] == {"utils.alpha"}
    assert graph["utils.group.gamma"] == {"utils.alpha", "utils.group.beta"}
    assert mutual_imports(graph) == [("utils.alpha", "utils.group.beta")]


def test_no_two_utils_modules_import_each_other():
    graph = import_graph(ROOT)
    assert "utils.config" in graph and graph["utils.cli"]  # the package was found and read
    assert mutual_imports(graph) == []


def test_config_error_is_still_importable_from_config():
    from utils.config import ConfigError
    from utils.errors import ConfigError as defined
    assert ConfigError is defined


if __name__ == "__main__":
    graph = import_graph(ROOT)
    for name in sorted(graph):
        print(f"{name} -> {', '.join(sorted(graph[name])) or '-'}")
    pairs = mutual_imports(graph)
    print("modules importing each other: " + ("; ".join(" <-> ".join(pair) for pair in pairs) or "none"))
    raise SystemExit(1 if pairs else 0)
