"""The package's layering, enforced: what each layer may import, where Lightning may be imported, no import cycle,
and no private torch or Lightning attribute outside the two compatibility modules (see docs/DESIGN.md)."""
from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

PKG = pathlib.Path(__file__).resolve().parents[1] / "lightning_ckpt"

# lowest first; a module may import its own layer and the layers below
LAYERS = [
    ("errors", "version"),
    ("compat", "format", "policy"),
    ("store",),
    ("dcp",),
    ("read", "load"),
    ("writer",),
    ("folder",),
    ("session", "tools", "extras"),
    ("callbacks",),
    ("cli", "extras.hpo", "demo"),
    ("__init__",),
]
LIGHTNING_ALLOWED = ("callbacks", "extras.hpo", "demo")
COMPAT_MODULES = ("compat", "callbacks.compat")
# layers that stand side by side: neither imports the other (the session runs a fit; the tools work on folders)
SIDE_BY_SIDE = [("session", "tools")]
# whole layers that must stay pure: no I/O, no torch.distributed, nothing of this package but themselves
PURE = {"policy": ("policy", "errors")}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__") or "__init__"
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def layer_of(mod: str) -> int:
    best, rank = -1, -1
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (mod == prefix or mod.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"lightning_ckpt.{mod} belongs to no layer; add it to LAYERS in {__file__}"
    return rank


def imports_of(mod: str, tree: ast.Module, *, annotations: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the module, function-level ones included; with ``annotations``
    also those under ``if TYPE_CHECKING:`` (never imported at run time, but a dependency all the same)."""
    pkg_parts = mod.split(".") if mod != "__init__" else []
    is_pkg = (PKG / mod.replace(".", "/") / "__init__.py").exists() or mod == "__init__"
    out = []
    skipped = {id(n) for n in ast.walk(tree) if isinstance(n, ast.If) and isinstance(n.test, ast.Name)
               and n.test.id == "TYPE_CHECKING" for n in ast.walk(n)}  # annotations only: never imported at run time
    for node in ast.walk(tree):
        if id(node) in skipped and not annotations:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts if is_pkg else pkg_parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(["lightning_ckpt", *base] + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
                out += [(n, node.lineno) for n in names] if not node.module else [(target, node.lineno)]
            else:
                out.append((node.module or "", node.lineno))
    return out


def internal(target: str, known: set[str]) -> str | None:
    """``lightning_ckpt.x.y[.name]`` -> the package module it names (``x.y``), or None for outside modules."""
    if target == "lightning_ckpt":
        return "__init__"
    if not target.startswith("lightning_ckpt."):
        return None
    parts = target.split(".")[1:]
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) if parts else "__init__"


def test_each_layer_imports_only_its_own_and_lower_layers_and_lightning_only_above_the_core():
    mods = modules()
    known = set(mods)
    bad = []
    for mod, tree in mods.items():
        for target, line in imports_of(mod, tree):
            top = target.split(".")[0]
            if top in ("lightning", "pytorch_lightning") and not mod.startswith(LIGHTNING_ALLOWED):
                bad.append(f"lightning_ckpt.{mod}:{line} imports {target}: only {LIGHTNING_ALLOWED} may import Lightning")
            dep = internal(target, known)
            if dep is None or dep == mod or mod == "__init__":
                continue
            if layer_of(dep) > layer_of(mod):
                bad.append(f"lightning_ckpt.{mod}:{line} imports lightning_ckpt.{dep}, a higher layer")
            for a, b in SIDE_BY_SIDE:
                for x, y in ((a, b), (b, a)):
                    if (mod == x or mod.startswith(x + ".")) and (dep == y or dep.startswith(y + ".")):
                        bad.append(f"lightning_ckpt.{mod}:{line} imports lightning_ckpt.{dep}: {x} and {y} stand side "
                                   "by side (what both need belongs in a layer below them, such as folder/)")
            for pure, allowed in PURE.items():
                if mod.startswith(pure) and not dep.startswith(allowed):
                    bad.append(f"lightning_ckpt.{mod}:{line} imports lightning_ckpt.{dep}; {pure} stays pure")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_among_the_package_modules_not_even_for_annotations():
    """Imports under ``if TYPE_CHECKING:`` count: a cycle hidden there is a cycle of the design all the same."""
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, tree in mods.items():
        for target, _ in imports_of(mod, tree, annotations=True):
            dep = internal(target, known)
            if dep is not None and dep != mod and mod != "__init__" and dep != "__init__":
                if mod.startswith(dep + ".") or dep.startswith(mod + "."):
                    continue  # a package and its own modules
                graph[mod].add(dep)
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]) if d in stack else f"{m} -> {d}")
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _own_names(mods: dict[str, ast.Module]) -> set[str]:
    """Every name this package defines: functions, classes, attributes it assigns, parameters, dataclass fields."""
    names: set[str] = set()
    for tree in mods.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return names


def test_private_torch_and_lightning_attributes_are_used_only_in_the_compatibility_modules():
    mods = modules()
    own = _own_names(mods)
    bad = []
    for mod, tree in mods.items():
        if mod in COMPAT_MODULES:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if node.attr not in own:
                    bad.append(f"lightning_ckpt.{mod}:{node.lineno} uses the private attribute {node.attr!r}")
        for target, line in imports_of(mod, tree):
            if target.split(".")[0] in ("torch", "lightning") and any(p.startswith("_") for p in target.split(".")):
                bad.append(f"lightning_ckpt.{mod}:{line} imports the private module {target}")
    assert not bad, "use these through lightning_ckpt/compat.py or lightning_ckpt/callbacks/compat.py:\n" + "\n".join(bad)


def test_no_module_is_over_about_400_lines_unless_it_says_why():
    long = []
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        n = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if n > 450 or (n > 400 and "one cohesive" not in doc.lower()):
            long.append(f"{path.relative_to(PKG)}: {n} lines")
    assert not long, "split these by concern (or say why not in their opening docstring):\n" + "\n".join(long)


def test_only_the_store_decides_whether_a_location_is_local_or_s3():
    """A new backend touches the store package only: nothing else tests a path for a URI scheme."""
    bad = []
    for mod, tree in modules().items():
        if mod == "store" or mod.startswith("store."):
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("startswith", "partition", "split")
                    and any(isinstance(a, ast.Constant) and isinstance(a.value, str) and "://" in a.value
                            for a in node.args)):
                bad.append(f"lightning_ckpt.{mod}:{node.lineno}")
    assert not bad, "ask lightning_ckpt.store (is_remote, open_store, folder_key, locate) instead:\n" + "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    """What another module needs is public: ``from ..read import _scan`` couples a module to another's internals."""
    bad = []
    for mod, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lightning_ckpt")):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"lightning_ckpt.{mod}:{node.lineno} imports {a.name} from {node.module or '.'}")
    assert not bad, "make these public (or move them where they belong):\n" + "\n".join(bad)


def _asks_backend(node: ast.AST) -> bool:
    """Does this expression ask which backend a store or a location is? ``x.remote``, ``is_remote(...)``,
    ``isinstance(x, S3Store/LocalStore)``."""
    if isinstance(node, ast.Attribute) and node.attr == "remote" and isinstance(node.ctx, ast.Load):
        return True
    if isinstance(node, ast.Call):
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if name == "is_remote":
            return True
        if name == "isinstance" and len(node.args) == 2:
            kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            return any(isinstance(k, (ast.Name, ast.Attribute)) and (getattr(k, "id", None) or getattr(k, "attr", ""))
                       in ("S3Store", "LocalStore", "S3Transaction", "LocalTransaction") for k in kinds)
    return False


MAX_BACKEND_QUESTIONS = 5


def test_at_most_a_handful_of_lines_outside_the_store_ask_which_backend_a_store_is():
    """One store contract both backends honour: a caller that holds a Store never asks which one it is. The few
    lines allowed are where a user's location decides what a run does (staging an s3:// folder locally)."""
    lines = set()
    for mod, tree in modules().items():
        if mod == "store" or mod.startswith("store."):
            continue
        for node in ast.walk(tree):
            if _asks_backend(node):
                lines.add(f"lightning_ckpt.{mod}:{node.lineno}")
    assert len(lines) <= MAX_BACKEND_QUESTIONS, (
        f"{len(lines)} lines outside store/ ask which backend a store is (at most {MAX_BACKEND_QUESTIONS}); use the "
        "store contract (store/base.py) instead:\n" + "\n".join(sorted(lines)))
