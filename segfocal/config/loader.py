"""YAML configs with ``_base_`` inheritance and dotted overrides, turned into :class:`Config`.

A config file may name one or more ``_base_`` files (paths relative to itself, else recipes shipped
with segfocal such as ``_base_/default.yaml``); they are merged first, in order, then the file's own
keys. The rule: **sections merge, values replace**. A section (``data``, ``train``, ``train.ema``,
``data.synthetic``, ...) merges key by key; any value, a mapping such as ``model.kwargs`` or
``data.label_map`` and a list included, replaces the base's whole, so a config can drop a key its
base set. Two bases that set one key to different values are an error naming both files (say which
wins by setting it in the config itself). ``--set key.sub=value`` overrides are parsed as YAML
values and applied last. Errors are :class:`ConfigError`, one line naming the file and the key.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterable, Tuple, Union

import yaml
from pydantic import ValidationError

from .errors import ConfigError, config_error, is_model, union_members
from .schema import Config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # the recipes of configs/, shipped in the wheel
MAX_VALUES = 100_000  # a config, its YAML aliases expanded, holds fewer values than this


def load_config(path: Union[str, Path], overrides: Iterable[str] = ()) -> Config:
    """Read ``path`` (following ``_base_``), apply ``key=value`` overrides, validate, return a Config.

    ``path`` is a YAML file or the name of a recipe shipped with segfocal (``synthetic_unet_focal``).
    """
    path = config_path(path)
    return config_from_tree(load_yaml_tree(path), overrides, source=str(path))


def config_from_tree(raw: Dict[str, Any], overrides: Iterable[str] = (), source: str = "config") -> Config:
    """A validated Config from a nested dict (a YAML tree, or one saved in a checkpoint) and overrides."""
    raw = copy.deepcopy(raw)
    overrides = list(overrides)
    for override in overrides:
        apply_override(raw, override)
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        set_keys = {override.partition("=")[0].strip(): f"--set {override}" for override in overrides}
        raise config_error(error, Config, source, set_keys) from None


def config_path(name: Union[str, Path]) -> Path:
    """``name`` if it is a file, else the shipped recipe of that name (with or without ``.yaml``)."""
    path = Path(name)
    if path.is_file() or path.parent != Path("."):
        return path
    for candidate in (RECIPES / path.name, RECIPES / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    recipes = sorted(recipe.stem for recipe in RECIPES.glob("*.yaml"))
    raise ConfigError(f"config file not found: {name} (nor a shipped recipe of that name: {', '.join(recipes)})")


def load_yaml_tree(path: Path) -> Dict[str, Any]:
    """The merged dictionary of ``path`` and its ``_base_`` files."""
    return _merged_file(path, ()).tree


class _Merged:
    """A file's tree with its bases merged in, which file set each value (dotted key -> path), and the
    files it was read from."""

    def __init__(self, tree: Dict[str, Any], origins: Dict[str, Path], files: FrozenSet[Path]) -> None:
        self.tree, self.origins, self.files = tree, origins, files


def _merged_file(path: Path, seen: Tuple[Path, ...]) -> _Merged:
    try:
        path = path.resolve()
        found = path.is_file()
    except (OSError, ValueError) as error:  # e.g. a NUL byte or an over-long name
        raise ConfigError(f"invalid config path {str(path)!r}: {error}") from None
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle through {' -> '.join(str(p) for p in seen)}")
    if not found:
        raise ConfigError(f"config file not found: {path}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(base, str) and base for base in bases):
        raise ConfigError(f"{path}: _base_ must be a file name or a list of file names, got {bases!r}")
    own = {key: path for key in _value_keys(data)}
    merged = _Merged({}, {}, frozenset())
    for base in bases:
        merged = _merge_base(merged, _merged_file(_base_path(path.parent, base), seen + (path,)), path, own)
    return _Merged(deep_merge(merged.tree, data), {**merged.origins, **own}, merged.files | {path})


def _merge_base(merged: _Merged, base: _Merged, path: Path, settled: Dict[str, Path]) -> _Merged:
    """``base`` merged over the bases before it. A value ``base`` has from a file that an earlier base read
    too (a shared ``_base_/default.yaml``) does not undo that base's own setting of it; a value both set
    differently, each in a file the other did not read, is a conflict, unless the config ``path`` itself
    sets it (the ``settled`` keys)."""
    shared = []
    for key, origin in base.origins.items():
        before = merged.origins.get(key)
        if before is None or before == origin or key in settled:
            continue
        if origin in merged.files:
            shared.append(key)
        elif before not in base.files and _value_at(merged.tree, key) != _value_at(base.tree, key):
            raise ConfigError(f"{path}: its _base_ files {before} and {origin} set {key} differently "
                              f"({_value_at(merged.tree, key)!r} and {_value_at(base.tree, key)!r}); set {key} "
                              f"in {path.name} to say which")
    kept = {key: merged.origins[key] for key in shared}
    tree = deep_merge(merged.tree, _without(base.tree, shared))
    return _Merged(tree, {**merged.origins, **base.origins, **kept}, merged.files | base.files)


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as error:  # ValueError: e.g. a date 2001-13-45
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    _check_size(data, path)
    return data


def _check_size(tree: Any, path: Path) -> None:
    """Refuse a tree whose YAML aliases expand to :data:`MAX_VALUES` values or more (an alias bomb: a
    few lines that become billions when the config is written out) or to an endless one (an alias
    inside itself). Each distinct node is counted once, so this costs the file's size, not the expansion's."""
    sizes: Dict[int, int] = {}

    def size(node: Any, open_nodes: FrozenSet[int]) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in open_nodes:
            raise ConfigError(f"{path}: a YAML alias refers to a value that holds it; write the value out")
        if id(node) not in sizes:
            children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
            sizes[id(node)] = 1 + sum(size(child, open_nodes | {id(node)}) for child in children)
            if sizes[id(node)] >= MAX_VALUES:
                raise ConfigError(f"{path}: its YAML aliases expand to more than {MAX_VALUES} values; a config "
                                  f"is far smaller (remove the aliases or write the values out)")
        return sizes[id(node)]

    size(tree, frozenset())


def _base_path(folder: Path, base: str) -> Path:
    """A ``_base_`` entry: the file relative to the config, else a shipped recipe of that name
    (``_base_/default.yaml``, ``camvid_unet_focal``), so a config copied anywhere keeps its bases."""
    relative = folder / base
    for candidate in (relative, RECIPES / base, RECIPES / f"{base}.yaml"):
        try:
            if candidate.is_file():
                return candidate
        except (OSError, ValueError):  # an over-long name or a NUL byte: _merged_file names it
            break
    return relative


def _yaml_problem(error: Exception) -> str:
    """A YAML error in one line: the problem and where (PyYAML's own message spans several)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def _is_section(key: str) -> bool:
    """Whether the dotted ``key`` is a section of the schema (a model, or an optional one), whose keys
    merge one by one."""
    model: Any = Config
    for part in key.split("."):
        field = model.model_fields.get(part)
        if field is None:
            return False
        model = next((member for member in union_members(field.annotation) if is_model(member)), None)
        if model is None:
            return False
    return True


def deep_merge(base: Dict[str, Any], update: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``base`` updated by ``update``: sections merge key by key, values replace."""
    merged = dict(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and _is_section(dotted):
            merged[key] = deep_merge(merged[key], value, f"{dotted}.")
        else:
            merged[key] = value
    return merged


def _value_keys(tree: Dict[str, Any], prefix: str = "") -> Iterable[str]:
    """The dotted keys of ``tree``'s values (not of its sections)."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and _is_section(dotted):
            yield from _value_keys(value, f"{dotted}.")
        else:
            yield dotted


def _without(tree: Dict[str, Any], keys: Iterable[str]) -> Dict[str, Any]:
    """A copy of ``tree`` without the values at the dotted ``keys``."""
    tree = copy.deepcopy(tree)
    for key in keys:
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node[part]
        del node[leaf]
    return tree


def _value_at(tree: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def apply_override(raw: Dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` (value parsed as YAML) in the nested dictionary ``raw``."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must have the form key.sub=value")
    parts = key.strip().split(".")
    if not all(part.strip() for part in parts):
        raise ConfigError(f"override {override!r}: empty key part in {key.strip()!r}")
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as error:  # ValueError: e.g. a date 2024-02-30
        raise ConfigError(f"override {override!r}: invalid YAML value ({_yaml_problem(error)}); quote a string "
                          f"that starts with {{, [ or another YAML sign: {key.strip()}='\"...\"'") from None
    _check_size(value, Path(f"override {key.strip()}"))
    node = raw
    *parents, leaf = parts
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def to_dict(config: Config) -> Dict[str, Any]:
    """The config as plain YAML-serialisable data."""
    return config.model_dump()


def save_config(config: Config, path: Union[str, Path]) -> None:
    """Write the fully resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
