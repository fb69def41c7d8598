"""Which bundles volseg runs: those whose configs are exactly what volseg writes for the bundle's own recipe.

A MONAI bundle is code: its configs hold ``$`` expressions (evaluated Python), ``_target_`` components (any
importable callable), ``@`` references and ``%`` macros, ``logging.conf`` handler arguments are evaluated by
:func:`logging.config.fileConfig`, and ``scripts/`` is imported. No screen of that code can be sound, so volseg
does not read it. It regenerates, in memory, every config it would write for the recipe the bundle carries
(``configs/volseg_recipe.yaml``, read with ``yaml.safe_load`` and the schema, which refuses MONAI config syntax in
any value) and compares canonically:

- ``configs/`` holds only the files volseg writes; every JSON config parses to the same value as volseg's
  (``json`` equality: key order and formatting do not matter), ``logging.conf`` is volseg's text;
- ``scripts/`` holds exactly volseg's own modules (:mod:`volseg.bundle_scripts`) when the recipe needs them,
  nothing otherwise; compiled caches in it are deleted (Python would prefer them to the compared sources);
- no Python code (``.py``, ``.pyc``, ``.so``, ``.pth``, ...) anywhere else in the bundle.

The values that record a run rather than the recipe (the case lists and data folder in ``train.json``, metrics and
package versions in ``metadata.json``: :data:`RUN_RECORD`) are taken from the bundle, and must be plain data:
numbers, strings not starting with ``$``, ``@`` or ``%``, lists and mappings whose keys do not start with ``_``.

:func:`check_bundle` raises a one-line :class:`~volseg.errors.UserError` naming the first differing file and key
path (``--trust-bundle`` skips it); :func:`rewrite_bundle` writes a bundle's configs anew from its recipe,
keeping its weights and run record. :func:`safe_torch_load` loads weights with ``weights_only=True``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path, PurePosixPath
from typing import Any

from volseg import __version__
from volseg.errors import UserError
from volseg.recipe import config_syntax_problem

__all__ = ["RUN_RECORD", "bundle_problem", "check_bundle", "rewrite_bundle", "safe_torch_load"]

#: Top-level keys of a config that record the run (taken from the bundle when comparing; must be plain data).
RUN_RECORD: dict[str, tuple[str, ...]] = {
    "configs/train.json": ("dataset_dir", "train_cases", "val_cases"),
    "configs/metadata.json": (
        "changelog",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "optional_packages_version",
        "supported_apps",
        "data_source",
        "eval_metrics",
    ),
}
#: Files volseg wrote into configs/ in earlier releases, which no tool reads; tolerated, never evaluated.
LEGACY_FILES = frozenset({"configs/volseg_manifest.json"})
_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".pyd", ".pth", ".dylib", ".dll")
_HINT = "pass --trust-bundle to run it anyway"


def _unnamed_module(rel: str, configs_text: str) -> bool:
    """Whether ``rel`` is a module of scripts/ (not the package's __init__) that the configs never name."""
    path = PurePosixPath(rel)
    return (path.parts[0] == "scripts" and len(path.parts) == 2 and path.suffix == ".py"
            and path.stem != "__init__" and f"scripts.{path.stem}" not in configs_text)  # fmt: skip


class _Mismatch(Exception):
    """A bundle that differs from what volseg writes for its recipe (the message says where)."""


# --------------------------------------------------------------------------------------------------------
# Comparison


def _first_difference(expected: Any, actual: Any, where: str = "") -> str | None:
    """Where and how two parsed JSON values first differ (the place in MONAI's id notation, ``a#b#0``); None if
    they are equal."""
    at = where or "the top level"
    if isinstance(expected, dict) and isinstance(actual, dict):
        # A component's _target_ first: a different component is named as such, not by its first argument.
        keys = list(expected) + [k for k in actual if k not in expected]
        if "_target_" in keys:
            keys.insert(0, keys.pop(keys.index("_target_")))
        for key in keys:
            here = f"{where}#{key}" if where else key
            if key not in actual:
                return f"at {here}: a key volseg writes is missing"
            if key not in expected:
                return f"at {here}: a key volseg does not write"
            diff = _first_difference(expected[key], actual[key], here)
            if diff:
                return diff
        return None
    if isinstance(expected, list) and isinstance(actual, list):
        for i, (e, a) in enumerate(zip(expected, actual, strict=False)):
            diff = _first_difference(e, a, f"{where}#{i}" if where else str(i))
            if diff:
                return diff
        if len(expected) != len(actual):
            return f"at {at}: {len(actual)} items where volseg writes {len(expected)}"
        return None
    # bool is an int to Python and NaN is not equal to itself: both count as differences.
    if type(expected) is not type(actual) or expected != actual:
        return f"at {at}: a value other than volseg's"
    return None


def _load_json(root: Path, rel: str) -> Any:
    try:
        return json.loads((root / rel).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise _Mismatch(f"{rel} cannot be read ({exc.__class__.__name__})") from None
    except ValueError as exc:
        raise _Mismatch(f"{rel} is not valid JSON ({exc})") from None


def _bundle_tree(root: Path) -> tuple[set[str], list[Path]]:
    """(relative paths of the files under configs/ and scripts/, compiled caches under scripts/)."""
    files: set[str] = set()
    caches: list[Path] = []
    for folder in ("configs", "scripts"):
        base = root / folder
        if base.is_symlink() or (base.exists() and not base.is_dir()):
            raise _Mismatch(f"{folder} is not a folder")
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(root)
            if folder == "scripts" and "__pycache__" in rel.parts:
                if path.is_file():
                    caches.append(path)
                continue
            if path.is_symlink():
                raise _Mismatch(f"{rel.as_posix()} is a symbolic link")
            if path.is_file():
                files.add(rel.as_posix())
            elif not path.is_dir():
                raise _Mismatch(f"{rel.as_posix()} is not a regular file")
    return files, caches


def _code_elsewhere(root: Path) -> str | None:
    """Python code outside configs/ and scripts/; a fold's own bundle (folds/fold_k/) and a cascade's fine stage
    (stages/fine/) may hold volseg's scripts."""
    from volseg.bundle import SCRIPTS_SOURCE

    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        nested = rel.parts[0] in ("folds", "stages")
        if rel.parts[0] in ("configs", "scripts") or "__pycache__" in rel.parts[:4] and nested:
            continue
        if not path.name.lower().endswith(_CODE_SUFFIXES) or path.is_dir():
            continue
        fold_script = len(rel.parts) == 4 and nested and rel.parts[2] == "scripts"
        own = SCRIPTS_SOURCE / rel.parts[-1]
        if fold_script and not path.is_symlink() and own.is_file() and own.read_bytes() == path.read_bytes():
            continue
        return f"{rel.as_posix()} is Python code outside scripts/"
    return None


def _run_record(rel: str, actual: Any) -> dict[str, Any]:
    """The run-record values of a parsed config, each checked to be plain data."""
    if not isinstance(actual, dict):
        raise _Mismatch(f"{rel} is not a JSON object")
    record = {key: actual[key] for key in RUN_RECORD.get(rel, ()) if key in actual}
    problem = config_syntax_problem(record)
    if problem:
        raise _Mismatch(f"{rel}: {problem}")
    return record


def _verified_configs(root: Path) -> dict[str, Any]:
    """Compare the bundle with volseg's files for its recipe; return its parsed JSON configs, or raise _Mismatch."""
    from volseg.bundle import RECIPE_FILE, read_bundle_recipe

    present, caches = _bundle_tree(root)
    if RECIPE_FILE not in present:
        raise _Mismatch(f"not written by volseg ({RECIPE_FILE} is missing)")
    try:
        recipe = read_bundle_recipe(root)
    except UserError as err:
        raise _Mismatch(f"{RECIPE_FILE}: {err.message}") from None
    try:
        return _verified_against(root, recipe, present, caches, chain_mirroring=True)
    except _Mismatch as mismatch:
        if not recipe.infer.tta_flips:
            raise
        first = mismatch
    try:  # written before the chain mirrored (volseg's engines then mirror for it)
        return _verified_against(root, recipe, present, caches, chain_mirroring=False)
    except _Mismatch:
        raise first from None


def _verified_against(
    root: Path, recipe: Any, present: set[str], caches: list[Path], chain_mirroring: bool
) -> dict[str, Any]:
    """:func:`_verified_configs` against one form of volseg's files for the recipe."""
    from volseg.bundle import CONFIG_FILES, RECIPE_FILE, bundle_files

    files = bundle_files(recipe, chain_mirroring=chain_mirroring)
    expected = {rel: text for rel, text in files.items() if rel.startswith(("configs/", "scripts/"))}
    extra = sorted(present - set(expected) - LEGACY_FILES)
    if extra:
        raise _Mismatch(f"{extra[0]} is not a file volseg writes")
    # A module of scripts/ that no config names (one added to volseg after the bundle was written) may be absent.
    named = "".join(text for rel, text in expected.items() if rel.startswith("configs/"))
    missing = sorted(rel for rel in set(expected) - present - {RECIPE_FILE}
                     if not _unnamed_module(rel, named))  # fmt: skip
    if missing:
        raise _Mismatch(f"{missing[0]} is missing")
    problem = _code_elsewhere(root)
    if problem:
        raise _Mismatch(problem)
    parsed: dict[str, Any] = {}
    for rel in CONFIG_FILES:
        if not rel.endswith(".json"):
            continue
        actual = _load_json(root, rel)
        want = json.loads(expected[rel])
        want.update(_run_record(rel, actual))
        for key in RUN_RECORD.get(rel, ()):
            if key not in actual:
                want.pop(key, None)
        diff = _first_difference(want, actual)
        if diff:
            raise _Mismatch(f"{rel} is not what volseg writes for the bundle's recipe, {diff}")
        parsed[rel] = actual
    for rel in sorted(r for r in expected if not r.endswith(".json") and r != RECIPE_FILE):
        if rel not in present and _unnamed_module(rel, named):
            continue
        try:
            same = (root / rel).read_bytes() == expected[rel].encode("utf-8")
        except OSError as exc:
            raise _Mismatch(f"{rel} cannot be read ({exc.__class__.__name__})") from None
        if not same:
            raise _Mismatch(f"{rel} is not what volseg writes")
    for pyc in caches:
        try:
            pyc.unlink()
        except OSError:
            raise _Mismatch(f"{pyc.relative_to(root).as_posix()} is compiled code that cannot be removed") from None
    return parsed


def _writer_version(root: Path) -> str | None:
    try:
        meta = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
        version = meta["supported_apps"]["volseg"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return version if isinstance(version, str) and len(version) < 40 else None


# --------------------------------------------------------------------------------------------------------
# Public API


def bundle_problem(bundle_dir: str | Path) -> str | None:
    """Why a bundle's configs are not exactly what volseg writes for its recipe (one line), or None.

    Compiled caches under ``scripts/`` are deleted when everything else matches.
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        return "bundle folder not found"
    try:
        _verified_configs(root)
    except _Mismatch as exc:
        return _with_version(root, str(exc))
    return None


def _with_version(root: Path, problem: str) -> str:
    writer = _writer_version(root)
    if writer and writer != __version__:
        return (
            f"{problem} (the bundle was written by volseg {writer}, this is {__version__}: "
            f"`volseg rewrite-bundle {root}` writes its configs anew from its recipe, keeping its weights)"
        )
    return problem


def check_bundle(bundle_dir: str | Path, trust: bool = False) -> dict[str, Any] | None:
    """Refuse a bundle whose configs are not exactly volseg's for its recipe, unless ``trust`` (``--trust-bundle``).

    Returns:
        The bundle's parsed JSON configs (relative path -> value) as compared, for the caller to build from without
        reading the files again; None when ``trust`` skipped the check.

    Raises:
        UserError: one line naming the bundle, the first differing file and key path, and the way out.
    """
    if trust:
        return None
    root = Path(bundle_dir)
    if not root.is_dir():
        raise UserError("bundle folder not found", root)
    try:
        return _verified_configs(root)
    except _Mismatch as exc:
        raise UserError(f"{_with_version(root, str(exc))}; {_HINT}", root) from None


def rewrite_bundle(bundle_dir: str | Path, echo: Any = print) -> list[str]:
    """Write a bundle's configs, scripts/ and docs anew from its recipe; weights, case lists and metrics are kept.

    Files under configs/ and scripts/ that volseg does not write are removed. Run-record values that are not plain
    data are dropped. Returns the relative paths removed.
    """
    from volseg.bundle import bundle_files, read_bundle_recipe
    from volseg.fileio import write_text_atomic

    root = Path(bundle_dir)
    if not root.is_dir():
        raise UserError("bundle folder not found", root)
    recipe = read_bundle_recipe(root)
    kept: dict[str, Any] = {}
    for rel in RUN_RECORD:
        try:
            actual = json.loads((root / rel).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(actual, dict):
            for key in RUN_RECORD[rel]:
                if key in actual and config_syntax_problem(actual[key]) is None:
                    kept[key] = actual[key]
    metrics = kept.get("eval_metrics")
    if not (isinstance(metrics, dict) and all(isinstance(v, (int, float)) for v in metrics.values())):
        metrics = None
    cases = {k: kept.get(k) for k in ("train_cases", "val_cases")}
    for key, value in cases.items():
        ok = isinstance(value, list) and all(
            isinstance(c, dict) and all(_case_path(v) for v in c.values()) for c in value
        )
        cases[key] = value if ok else None
    dataset_dir = kept.get("dataset_dir")
    note = kept.get("data_source")
    files = bundle_files(
        recipe,
        dataset_dir=dataset_dir if isinstance(dataset_dir, str) else None,
        train_cases=cases["train_cases"],
        val_cases=cases["val_cases"],
        metrics=metrics,
        data_note=note if isinstance(note, str) and note != "see docs/README.md" else "",
    )
    removed: list[str] = []
    for folder in ("configs", "scripts"):
        base = root / folder
        if base.is_dir():
            for path in sorted(base.rglob("*"), reverse=True):
                rel = path.relative_to(root).as_posix()
                if path.is_symlink() or (path.is_file() and rel not in files):
                    path.unlink()
                    removed.append(rel)
                elif path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                    path.rmdir()
    for rel, text in files.items():
        write_text_atomic(root / rel, text)
    for rel in sorted(removed):
        echo(f"removed {rel}")
    return sorted(removed)


def _case_path(value: Any) -> bool:
    """A case's file: a path, or a list of channel files."""
    return isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    )


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
    except pickle.UnpicklingError:
        raise UserError(
            "cannot load weights: the file holds pickled Python objects, not only tensors (refused: unpickling runs "
            "code)",
            path,
        ) from None
    except Exception as exc:  # noqa: BLE001 - every unreadable checkpoint is the user's file problem
        text = " ".join(str(exc).split())
        reason = exc.__class__.__name__ + (f": {text[:160]}" + ("..." if len(text) > 160 else "") if text else "")
        raise UserError(f"cannot load weights ({reason})", path) from None
