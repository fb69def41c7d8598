"""Untrusted bundles: a MONAI bundle config can run code, so volseg runs only what it can vouch for.

A bundle's configs may hold ``$`` expressions (Python, evaluated) and ``_target_`` components (any importable
callable), and its ``scripts/`` package is imported. :func:`check_bundle` refuses, unless the user passes
``--trust-bundle``:

1. a bundle without volseg's manifest (``configs/volseg_manifest.json``, written by :func:`write_manifest` with
   the sha256 of every file under ``configs/`` and ``scripts/``), or one whose hashed files differ from it or
   were added or removed since;
2. ``scripts/`` code that is not volseg's own (every ``.py`` file must equal the one volseg ships in
   ``volseg/bundle_scripts``), and Python code (``.py``, ``.pyc``, ``.so``) anywhere else in the bundle;
   compiled caches under ``scripts/__pycache__`` are deleted, since they cannot be checked and Python would
   prefer them to the checked sources;
3. a ``_target_`` that is not a MONAI short name (a class or function MONAI's component locator finds) or a
   dotted path under ``monai.``, ``torch.`` or ``scripts.``; and, among those, the escape hatches that load or
   run other code (``monai.bundle``, ``monai.utils.module`` such as ``instantiate``/``optional_import``,
   ``torch.hub``, ``torch.load``, ``numpy.load``, C++ extensions, ...);
4. a ``$`` expression using anything outside an allow-list: it is parsed with :mod:`ast` (``@id`` references
   replaced by placeholder names first) and may use only constants, operators, calls, subscripts,
   comprehensions and lambdas over the names ``torch``, ``monai``, ``numpy``/``np``, ``glob``, ``os.path``,
   ``ignite``, ``scripts``, a few builtins (:data:`ALLOWED_BUILTINS`), lambda parameters, comprehension
   variables and what the config imports (``$import``/``$from ... import`` of those modules only). Other names
   (``eval``, ``exec``, ``open``, ``getattr``, ``__import__``, ...), attributes starting with ``_`` and
   attributes such as ``system`` or ``popen`` are refused; module attributes are resolved and must stay inside
   those libraries (``torch.os`` or ``glob.os`` is refused);
5. a macro (``%file#id``) that pulls content from another file, ``_mode_: debug``, and ``weights_only`` other
   than true or ``allow_pickle`` other than false (unpickling runs code).

The manifest only shows that the files are as volseg wrote them (anyone can write a matching manifest), which
is why checks 2 to 5 apply to every bundle. This is a screen that refuses the unusual, not a sandbox.

:func:`safe_torch_load` loads weights with ``weights_only=True`` (no pickled code), any failure a UserError.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import os
import re
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from volseg import __version__
from volseg.errors import UserError

__all__ = ["ALLOWED_BUILTINS", "MANIFEST", "check_bundle", "expression_problem", "safe_torch_load", "write_manifest"]

#: The manifest, relative to the bundle folder.
MANIFEST = "configs/volseg_manifest.json"
#: Folders whose files the manifest hashes.
HASHED_DIRS = ("configs", "scripts")
#: Builtins an expression may call.
ALLOWED_BUILTINS = frozenset(
    {
        "list", "tuple", "dict", "set", "sorted", "reversed", "len", "zip", "range", "enumerate", "max", "min",
        "sum", "abs", "round", "any", "all", "str", "int", "float", "bool", "isinstance", "True", "False", "None",
    }
)  # fmt: skip
#: Names an expression may use without importing them, and the module each stands for.
ROOT_MODULES = {
    "torch": "torch",
    "monai": "monai",
    "numpy": "numpy",
    "np": "numpy",
    "glob": "glob",
    "os": "os",
    "ignite": "ignite",
    "scripts": "scripts",
}
#: Modules that ``$import`` may name (and their submodules).
IMPORTABLE = frozenset({"torch", "monai", "numpy", "glob", "os", "ignite", "scripts"})
#: Where resolved modules and functions may live.
ALLOWED_HOMES = ("torch", "monai", "numpy", "glob", "posixpath", "ntpath", "genericpath", "ignite")
#: Libraries' escape hatches: they import, download, unpickle or compile other code.
DENIED = (
    "monai.bundle",
    "monai.utils.module",
    "monai.apps.utils",
    "torch.hub",
    "torch.serialization",
    "torch.utils.cpp_extension",
    "torch.package",
    "torch.ops",
    "torch.classes",
    "torch.library",
    "numpy.load",
    "numpy.lib.npyio",
    "numpy.lib.format",
    "numpy.ctypeslib",
    "numpy.f2py",
    "numpy.distutils",
    "numpy.testing",
)
#: Attribute and import names refused wherever they appear (besides any name starting with "_"). ``eval`` and
#: ``compile`` are refused as names but allowed as attributes (``@network.eval()``, ``torch.compile``): module
#: attributes are resolved, so a builtin re-exported by a module is caught there.
DENIED_NAMES = frozenset(
    {
        "os", "sys", "subprocess", "builtins", "importlib", "shutil", "pickle", "marshal", "ctypes", "socket",
        "runpy", "pdb", "code", "codeop", "inspect", "gc", "pty", "system", "popen", "Popen", "spawnl", "spawnv",
        "spawnve", "spawnle", "spawnlp", "spawnvp", "execl", "execle", "execlp", "execv", "execve", "execvp",
        "execvpe", "fork", "forkpty", "kill", "killpg", "exec", "open", "fdopen", "getattr",
        "setattr", "delattr", "globals", "locals", "vars", "breakpoint", "input", "import_module", "reload",
        "load_library", "load_inline", "cpp_extension", "hub", "optional_import", "instantiate", "locate",
        "run_path", "run_module", "check_call", "check_output", "f_globals", "f_locals", "f_back", "f_builtins",
        "gi_frame", "gi_code", "cr_frame", "ag_frame", "tb_frame", "tb_next", "func_globals", "mro", "remove",
        "unlink", "rmtree", "rmdir", "removedirs", "rename", "renames", "chmod", "chown", "symlink", "link",
        "truncate", "write_text", "write_bytes", "mkfifo", "putenv", "unsetenv", "environ", "format_map",
    }
)  # fmt: skip

_MANIFEST_TMP = ".volseg_manifest.json."  # prefix of the manifest's temporary file while it is written
_REF = re.compile(r"@\w*(?:(?:::|#)\w*)*")
_PLACEHOLDER = "volseg_ref_{}"
_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".pyd", ".pth")
_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
_RECIPE_FILE = "configs/volseg_recipe.yaml"
_HINT = "pass --trust-bundle to run it anyway"


# --------------------------------------------------------------------------------------------------------
# Manifest


def _hashed_files(root: Path) -> dict[str, Path]:
    """Files under configs/ and scripts/ (relative POSIX path -> path), without the manifest and bytecode caches."""
    files: dict[str, Path] = {}
    for folder in HASHED_DIRS:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if (
                rel == MANIFEST
                or path.name.startswith(_MANIFEST_TMP)
                or "__pycache__" in path.relative_to(root).parts
                or not path.is_file()
            ):
                continue
            files[rel] = path
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(bundle_dir: str | Path) -> Path:
    """Record the sha256 of every file under ``configs/`` and ``scripts/`` (the manifest itself excluded).

    Call it last, after every write to ``configs/`` (metadata.json included). Written atomically.

    Returns:
        The manifest's path.
    """
    root = Path(bundle_dir)
    manifest = {
        "volseg_version": __version__,
        "algorithm": "sha256",
        "files": {rel: _sha256(path) for rel, path in _hashed_files(root).items()},
    }
    target = root / MANIFEST
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_MANIFEST_TMP, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target


def _manifest_problem(root: Path) -> str | None:
    path = root / MANIFEST
    if not path.is_file():
        return f"not written by volseg (no {MANIFEST})"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise TypeError("files is not a mapping of paths to hashes")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is damaged ({exc.__class__.__name__})"
    actual = _hashed_files(root)
    problems = [f"{rel} differs" for rel in sorted(set(files) & set(actual)) if _sha256(actual[rel]) != files[rel]]
    problems += [f"{rel} was added" for rel in sorted(set(actual) - set(files))]
    problems += [f"{rel} is missing" for rel in sorted(set(files) - set(actual))]
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"not written by volseg, or changed since: {', '.join(problems[:3])}{more}"


# --------------------------------------------------------------------------------------------------------
# Code in the bundle


def _code_problem(root: Path) -> str | None:
    own = Path(__file__).resolve().parent / "bundle_scripts"
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(root)
        in_scripts = rel.parts[0] == "scripts"
        if in_scripts and "__pycache__" in rel.parts:
            continue
        if not path.name.lower().endswith(_CODE_SUFFIXES):
            continue
        if not in_scripts:
            return f"{rel.as_posix()} is Python code outside scripts/"
        reference = own.joinpath(*rel.parts[1:])
        if path.suffix != ".py" or not reference.is_file() or reference.read_bytes() != path.read_bytes():
            return f"{rel.as_posix()} is not volseg's own bundle code"
    return None


def _drop_bytecode(root: Path) -> str | None:
    """Delete compiled caches under scripts/: Python would run them instead of the checked sources."""
    scripts = root / "scripts"
    if not scripts.is_dir():
        return None
    for cache in sorted(p for p in scripts.rglob("__pycache__") if p.is_dir()):
        for pyc in sorted(cache.iterdir()):
            try:
                pyc.unlink()
            except OSError:
                return f"{pyc.relative_to(root).as_posix()} is compiled code that cannot be checked or removed"
    return None


# --------------------------------------------------------------------------------------------------------
# Configs: targets, expressions, macros


def _config_files(root: Path) -> list[Path]:
    base = root / "configs"
    if not base.is_dir():
        return []
    skip = {MANIFEST, _RECIPE_FILE}
    return [
        p
        for p in sorted(base.rglob("*"))
        if p.is_file() and p.suffix.lower() in _CONFIG_SUFFIXES and p.relative_to(root).as_posix() not in skip
    ]


def _load_config(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        return json.loads(text)
    return yaml.safe_load(text)


def _walk(node: Any, where: str = "") -> Iterator[tuple[str, str, Any]]:
    """(id, key, value) for every entry of a config tree; key is the dict key or "" for list items."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}::{key}" if where else str(key)
            yield here, str(key), value
            yield from _walk(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            here = f"{where}::{i}" if where else str(i)
            yield here, "", value
            yield from _walk(value, here)


def _denied(dotted: str) -> bool:
    return any(dotted == d or dotted.startswith(d + ".") for d in DENIED)


def _home_ok(module: str) -> bool:
    return any(module == h or module.startswith(h + ".") for h in ALLOWED_HOMES)


@lru_cache(maxsize=1)
def _locator() -> Any:
    import monai  # noqa: F401 - loads MONAI's submodules, which the locator scans
    from monai.bundle.config_item import ComponentLocator

    return ComponentLocator()


def _object_problem(obj: Any, dotted: str) -> str | None:
    """Why a resolved module attribute may not be used, or None."""
    if inspect.ismodule(obj):
        name = obj.__name__
        if not _home_ok(name) or _denied(name):
            return f"{dotted} is the module {name}"
        return None
    if not callable(obj):
        return None
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str):
        return None
    qualname = getattr(obj, "__qualname__", getattr(obj, "__name__", ""))
    full = f"{module}.{qualname}"
    if _denied(module) or _denied(full) or _denied(dotted):
        return f"{dotted} ({full}) loads or runs other code"
    if module == "builtins":
        return None if inspect.isclass(obj) else f"{dotted} is the builtin {qualname}"
    if not _home_ok(module):
        return f"{dotted} comes from {module}"
    return None


@lru_cache(maxsize=4096)
def _dotted_problem(dotted: str) -> str | None:
    """Check a dotted name under an allowed root by resolving it attribute by attribute."""
    parts = dotted.split(".")
    for part in parts[1:]:
        if part.startswith("_") or part in DENIED_NAMES:
            return f"{dotted}: '{part}' is not allowed"
    if _denied(dotted):
        return f"{dotted} loads or runs other code"
    root = parts[0]
    if root == "scripts":
        return None
    if root == "os":
        if len(parts) == 1 or parts[1] != "path":
            return f"{dotted}: only os.path may be used"
    try:
        obj: Any = importlib.import_module(root)
    except ImportError:
        return None  # not installed here: it cannot run either
    for i in range(1, len(parts)):
        here = ".".join(parts[: i + 1])
        try:
            obj = getattr(obj, parts[i])
        except AttributeError:
            try:
                obj = importlib.import_module(here)
            except ImportError:
                return None  # unknown name: fails at run time, runs nothing
        problem = _object_problem(obj, here)
        if problem:
            return problem
    return None


def _target_problem(target: Any) -> str | None:
    if not isinstance(target, str) or not target or target[0] in "$@%":
        return f"_target_ {target!r} is not a class or function name"
    if "." not in target:
        modules = _locator().get_component_module_name(target)
        if not modules:
            return f"_target_ '{target}' is not a MONAI component"
        for module in [modules] if isinstance(modules, str) else modules:
            if _denied(module) or _denied(f"{module}.{target}"):
                return f"_target_ '{target}' ({module}.{target}) loads or runs other code"
        return None
    if not target.startswith(("monai.", "torch.", "scripts.")):
        return f"_target_ '{target}' is outside monai, torch and the bundle's scripts/"
    problem = _dotted_problem(target)
    return f"_target_ {problem}" if problem else None


class _Expression(ast.NodeVisitor):
    """Walks one parsed expression; raises ValueError with the reason at the first thing not allowed."""

    _ALLOWED_NODES = (
        ast.Expression, ast.Module, ast.Expr, ast.Import, ast.ImportFrom, ast.alias, ast.Name, ast.Attribute,
        ast.Call, ast.keyword, ast.Starred, ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.Set, ast.BinOp,
        ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Subscript, ast.Slice, ast.Lambda, ast.arguments,
        ast.arg, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.comprehension, ast.JoinedStr,
        ast.FormattedValue, ast.Load, ast.Store, ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
        ast.expr_context,
    )  # fmt: skip

    def __init__(self, bindings: dict[str, str], placeholders: set[str]) -> None:
        self.bindings = bindings  # global name -> dotted module path it stands for
        self.placeholders = placeholders
        self.scopes: list[set[str]] = []

    def _local(self, name: str) -> bool:
        return any(name in scope for scope in self.scopes)

    def generic_visit(self, node: ast.AST) -> None:
        if not isinstance(node, self._ALLOWED_NODES):
            raise ValueError(f"{type(node).__name__} is not allowed")
        super().generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            _check_import(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:
            raise ValueError("relative imports are not allowed")
        _check_import(node.module)
        for alias in node.names:
            _check_import(f"{node.module}.{alias.name}")

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and "__" in node.value:
            raise ValueError("strings naming dunder attributes are not allowed")  # str.format can reach them

    def visit_Name(self, node: ast.Name) -> None:
        name = node.id
        if isinstance(node.ctx, ast.Store):
            raise ValueError(f"assignment to '{name}' is not allowed")
        if self._local(name) or name in self.placeholders:
            return
        if name in ALLOWED_BUILTINS and name not in self.bindings:
            return
        if name in self.bindings:
            if self.bindings[name] == "os":
                raise ValueError("only os.path may be used")
            problem = _dotted_problem(self.bindings[name])
            if problem:
                raise ValueError(problem)
            return
        raise ValueError(f"name '{name}' is not allowed")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain: list[str] = []
        base: ast.expr = node
        while isinstance(base, ast.Attribute):
            if base.attr.startswith("_") or base.attr in DENIED_NAMES:
                raise ValueError(f"attribute '{base.attr}' is not allowed")
            chain.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and not self._local(base.id) and base.id in self.bindings:
            dotted = ".".join([self.bindings[base.id], *reversed(chain)])
            problem = _dotted_problem(dotted)
            if problem:
                raise ValueError(problem)
            return
        self.visit(base)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        args = node.args
        for default in [*args.defaults, *(d for d in args.kw_defaults if d is not None)]:
            self.visit(default)
        names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
        names |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
        self.scopes.append(names)
        self.visit(node.body)
        self.scopes.pop()

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> None:
        scope: set[str] = set()
        for i, gen in enumerate(node.generators):
            if gen.is_async:
                raise ValueError("async comprehensions are not allowed")
            if i == 0:
                self.visit(gen.iter)  # evaluated in the enclosing scope
            self.scopes.append(scope)
            if i > 0:
                self.visit(gen.iter)
            scope |= _target_names(gen.target)
            for cond in gen.ifs:
                self.visit(cond)
            self.scopes.pop()
        self.scopes.append(scope)
        if isinstance(node, ast.DictComp):
            self.visit(node.key)
            self.visit(node.value)
        else:
            self.visit(node.elt)
        self.scopes.pop()

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension


def _target_names(target: ast.expr) -> set[str]:
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Tuple, ast.List)):
        names: set[str] = set()
        for elt in target.elts:
            names |= _target_names(elt)
        return names
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    raise ValueError(f"comprehension target {type(target).__name__} is not allowed")


def _check_import(dotted: str) -> None:
    parts = dotted.split(".")
    if parts[0] not in IMPORTABLE:
        raise ValueError(f"import of {dotted} is not allowed")
    if "*" in parts:
        raise ValueError("import * is not allowed")
    if dotted == "os":
        return  # binds the name os, of which expressions may use only os.path
    if parts[0] == "os" and parts[1] != "path":
        raise ValueError(f"import of {dotted} is not allowed (only os.path)")
    problem = _dotted_problem(dotted)
    if problem:
        raise ValueError(problem)


def _bindings(import_stmts: list[ast.Module]) -> dict[str, str]:
    """Global names an expression sees: the root modules plus what the config's imports bind."""
    bindings = dict(ROOT_MODULES)
    for module in import_stmts:
        for stmt in module.body:
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname:
                        bindings[alias.asname] = alias.name
                    else:
                        root = alias.name.split(".")[0]
                        bindings[root] = root
            elif isinstance(stmt, ast.ImportFrom) and stmt.module:
                for alias in stmt.names:
                    bindings[alias.asname or alias.name] = f"{stmt.module}.{alias.name}"
    return bindings


def _parse(expr: str) -> tuple[ast.AST, set[str]]:
    """Parse an expression (after ``$``) with ``@`` references replaced by placeholder names."""
    placeholders: set[str] = set()

    def sub(_: re.Match[str]) -> str:
        name = _PLACEHOLDER.format(len(placeholders))
        placeholders.add(name)
        return name

    text = _REF.sub(sub, expr).strip()
    try:
        return ast.parse(text, mode="eval"), placeholders
    except SyntaxError:
        pass
    except (RecursionError, MemoryError, ValueError):
        raise ValueError("not a Python expression (too deeply nested, or null bytes)") from None
    try:
        tree = ast.parse(text, mode="exec")
    except SyntaxError as exc:
        raise ValueError(f"not a Python expression ({exc.msg})") from None
    except (RecursionError, MemoryError, ValueError):
        raise ValueError("not a Python expression (too deeply nested, or null bytes)") from None
    if not tree.body or not all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in tree.body):
        raise ValueError("statements other than imports are not allowed")
    return tree, placeholders


def expression_problem(expression: str, imports: tuple[str, ...] = ()) -> str | None:
    """Why a config expression (with its leading ``$``) would be refused, or None when it is allowed.

    Args:
        expression: e.g. ``"$@network_def.to(@device)"``.
        imports: the config's import expressions (``"$import glob"``), which bind names for it.
    """
    try:
        statements = [_parse(text.removeprefix("$"))[0] for text in imports]
        tree, placeholders = _parse(expression.removeprefix("$"))
        bindings = _bindings([t for t in [*statements, tree] if isinstance(t, ast.Module)])
        for statement in statements:
            _Expression(bindings, set()).visit(statement)
        _Expression(bindings, placeholders).visit(tree)
    except ValueError as exc:
        return str(exc)
    return None


def _config_problem(path: Path, rel: str) -> str | None:
    try:
        config = _load_config(path)
        entries = list(_walk(config))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError) as exc:
        return f"{rel} cannot be parsed ({exc.__class__.__name__})"
    expressions: list[tuple[str, str]] = [
        (where, value) for where, _, value in entries if isinstance(value, str) and value.startswith("$")
    ]
    if isinstance(config, str) and config.startswith("$"):
        expressions.append(("", config))
    parsed: list[tuple[str, str, ast.AST, set[str]]] = []
    for where, value in expressions:
        try:
            tree, placeholders = _parse(value[1:])
        except ValueError as exc:
            return f"{rel} {where}: expression {_short(value)} is refused: {exc}"
        parsed.append((where, value, tree, placeholders))
    bindings = _bindings([t for _, _, t, _ in parsed if isinstance(t, ast.Module)])
    for where, value, tree, placeholders in parsed:
        try:
            _Expression(bindings, placeholders).visit(tree)
        except ValueError as exc:
            return f"{rel} {where}: expression {_short(value)} is refused: {exc}"
    for where, key, value in entries:
        if key == "_target_":
            problem = _target_problem(value)
            if problem:
                return f"{rel} {where}: {problem}"
        elif key == "_mode_" and value == "debug":
            return f"{rel} {where}: _mode_ 'debug' starts an interactive debugger"
        elif (key == "weights_only" and value is not True) or (key == "allow_pickle" and value is not False):
            return f"{rel} {where}: {key}: {json.dumps(value)} lets pickled files run code"
        if isinstance(value, str) and value.startswith("%"):
            file_part = re.split(r"::|#", value[1:], maxsplit=1)[0]
            if file_part:
                return f"{rel} {where}: macro {_short(value)} pulls in another file"
    return None


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


# --------------------------------------------------------------------------------------------------------
# Public API


def check_bundle(bundle_dir: str | Path, trust: bool = False, configs: bool = True) -> None:
    """Refuse to run a bundle volseg cannot vouch for, unless ``trust`` (``--trust-bundle``) is given.

    Args:
        bundle_dir: the bundle folder.
        trust: skip every check.
        configs: also vet the configs' targets and expressions. Callers that evaluate no config (volseg's fast
            engine reads only the recipe and the weights) pass False and check again before they build one.

    Raises:
        UserError: naming the bundle, the file and the offending target or expression, and the way out
            (``--trust-bundle``).
    """
    if trust:
        return
    root = Path(bundle_dir)
    if not root.is_dir():
        raise UserError("bundle folder not found", root)
    problem = _manifest_problem(root) or _code_problem(root) or _drop_bytecode(root)
    if problem is None and configs:
        for path in _config_files(root):
            problem = _config_problem(path, path.relative_to(root).as_posix())
            if problem:
                break
    if problem:
        raise UserError(f"{problem}; {_HINT}", root)


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain containers, no code.

    Raises:
        UserError: the file is missing, damaged, or holds pickled objects other than weights.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError("cannot load weights (file not found)", path) from None
    except Exception as exc:  # noqa: BLE001 - every unreadable checkpoint is the user's file problem
        text = " ".join(str(exc).split())
        reason = exc.__class__.__name__ + (f": {text[:160]}" + ("..." if len(text) > 160 else "") if text else "")
        raise UserError(f"cannot load weights ({reason})", path) from None
