"""YAML configs with ``_base_`` inheritance and dotted overrides, turned into :class:`Config`.

A config file may name one or more ``_base_`` files (paths relative to itself, else recipes shipped
with segfocal such as ``_base_/default.yaml``); they are merged first, in order, and the file's own
keys override them key by key (dictionaries merge, everything else replaces). ``--set key.sub=value`` overrides are parsed as YAML values and applied last.
Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key, with the
closest valid key suggested.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import string
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Union

import yaml

from ..evaluation.report import class_names
from .schema import (CHOICES, PER_CLASS_METRICS, SUMMARY_METRICS, TERM_NAMES, TERM_OPTIONS, WEIGHT_SCHEMES, Config,
                     DataConfig, LossTermConfig, PatchesConfig)


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names it."""


RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # the recipes of configs/, shipped in the wheel


def load_config(path: Union[str, Path], overrides: Iterable[str] = ()) -> Config:
    """Read ``path`` (following ``_base_``), apply ``key=value`` overrides, validate, return a Config.

    ``path`` is a YAML file or the name of a recipe shipped with segfocal (``synthetic_unet_focal``).
    """
    path = config_path(path)
    return config_from_tree(load_yaml_tree(path), overrides, source=str(path))


def config_from_tree(raw: Dict[str, Any], overrides: Iterable[str] = (), source: str = "config") -> Config:
    """A validated Config from a nested dict (a YAML tree, or one saved in a checkpoint) and overrides."""
    raw = copy.deepcopy(raw)
    for override in overrides:
        apply_override(raw, override)
    config = from_dict(Config, raw, source=source)
    check_consistency(config, source=source)
    return config


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


def check_consistency(config: Config, source: str = "config") -> None:
    """Checks that involve a value's range or several keys; raise :class:`ConfigError` naming the key."""
    data, train = config.data, config.train
    positive = {
        "data.num_classes": data.num_classes, "data.batch_size": data.batch_size, "eval.batch_size": config.eval.batch_size,
        "train.accumulate": train.accumulate, "train.val_every": train.val_every, "train.log_every": train.log_every,
        "train.save_every": train.save_every,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{source}: {key} must be at least 1, got {value}")
    if train.iters is not None and train.iters < 1:
        raise ConfigError(f"{source}: train.iters must be at least 1 (or null to count train.epochs), got {train.iters}")
    for key, value in {"train.epochs": train.epochs, "data.num_workers": data.num_workers,
                       "train.max_bad_steps": train.max_bad_steps, "train.log_images": train.log_images,
                       "train.log_image_size": train.log_image_size, "train.max_log_mb": train.max_log_mb,
                       "train.patience": train.patience}.items():
        if value < 0:
            raise ConfigError(f"{source}: {key} must not be negative, got {value}")
    if data.class_names and len(data.class_names) != data.num_classes:
        raise ConfigError(f"{source}: data.class_names has {len(data.class_names)} names for "
                          f"data.num_classes={data.num_classes}")
    for key in ("mean", "std"):
        if len(getattr(data, key)) != config.model.in_channels:
            raise ConfigError(f"{source}: data.{key} needs one value per input channel "
                              f"(model.in_channels={config.model.in_channels}), got {getattr(data, key)}")
    for key in ("crop_size", "stride"):
        value = getattr(config.eval, key)
        if len(value) != 2 or min(value) < 1:
            raise ConfigError(f"{source}: eval.{key} must be [height, width] of positive ints, got {value}")
    _check_placeholders(config, source)
    _check_checkpoint_metric(config, source)
    _check_palette(config, source)
    _check_ranges(config, source)
    _check_data(config, source)


def _check_checkpoint_metric(config: Config, source: str) -> None:
    """``train.checkpoint_metric`` names a metric validation reports (a typo used to fail only at the
    first validation, and a per-class one with a TypeError)."""
    metric = config.train.checkpoint_metric
    kind, _, name = metric.partition(".")
    names = class_names(config.data.class_names, config.data.num_classes)
    if metric in SUMMARY_METRICS or (kind in PER_CLASS_METRICS and name in names):
        return
    if kind in PER_CLASS_METRICS and name:
        raise ConfigError(f"{source}: train.checkpoint_metric={metric!r}: no class {name!r}; the classes are "
                          f"{', '.join(names)}")
    raise ConfigError(f"{source}: train.checkpoint_metric={metric!r} is not a metric; choose one of "
                      f"{', '.join(SUMMARY_METRICS)}, or one class's {'/'.join(PER_CLASS_METRICS)} as "
                      f"'iou.<class name>'")


def _check_placeholders(config: Config, source: str) -> None:
    """Folder and split-file patterns may use ``{split}`` and nothing else (a typo was a KeyError at start)."""
    for key in ("image_dir", "mask_dir", "split_file"):
        pattern = getattr(config.data, key)
        if pattern is None:
            continue
        try:
            fields = {field for _, field, _, _ in string.Formatter().parse(pattern) if field is not None}
        except ValueError as error:  # an unmatched brace
            raise ConfigError(f"{source}: data.{key}={pattern!r} is not a valid pattern ({error}); "
                              f"write {{split}} for the split name and {{{{ }}}} for a literal brace") from None
        unknown = sorted(fields - {"split"})
        if unknown:
            raise ConfigError(f"{source}: data.{key}={pattern!r} uses the placeholder {{{unknown[0]}}}; "
                              f"the only one is {{split}} (the split's name)")


def _check_palette(config: Config, source: str) -> None:
    """``data.palette``, when given, is one [r, g, b] of 0..255 values per class."""
    palette, num_classes = config.data.palette, config.data.num_classes
    if palette is None:
        return
    if len(palette) != num_classes:
        raise ConfigError(f"{source}: data.palette has {len(palette)} colours for data.num_classes={num_classes}")
    for index, colour in enumerate(palette):
        if len(colour) != 3 or not all(0 <= value <= 255 for value in colour):
            raise ConfigError(f"{source}: data.palette[{index}] must be [r, g, b] with values 0..255, got {colour}")


def _check_data(config: Config, source: str) -> None:
    """``data.scale``, ``data.label_map``, ``data.reduce_zero_label``, ``data.val_fraction`` and ``data.layout``'s
    folder keys."""
    data, default = config.data, DataConfig()
    if data.scale is not None and not (math.isfinite(data.scale) and data.scale > 0):
        raise ConfigError(f"{source}: data.scale must be a finite number > 0 (or null: the type's full range), "
                          f"got {data.scale!r}")
    if data.label_map is not None and data.reduce_zero_label:
        raise ConfigError(f"{source}: data.label_map and data.reduce_zero_label are both set; use one (list the "
                          f"shifted ids in data.label_map)")
    for key, value in (data.label_map or {}).items():
        where = f"{source}: data.label_map[{key!r}]={value!r}"
        if type(key) is not int or key < 0:
            raise ConfigError(f"{where}: stored mask values are integers >= 0")
        if type(value) is not int or not (0 <= value < data.num_classes or value == data.ignore_index):
            raise ConfigError(f"{where}: a train id must be a class 0..{data.num_classes - 1} "
                              f"(data.num_classes={data.num_classes}) or data.ignore_index={data.ignore_index}")
    if data.val_fraction is not None and not (0 < data.val_fraction < 1 and data.val_split != data.train_split):
        raise ConfigError(f"{source}: data.val_fraction={data.val_fraction!r} must be in (0, 1), with data.val_split "
                          f"(the carved part, {data.val_split!r}) named apart from data.train_split")
    if data.patches is not None:
        _check_patches(data.patches, source)
    if data.layout != "folder":
        for key in ("image_dir", "mask_dir", "split_file"):
            if getattr(data, key) != getattr(default, key):
                raise ConfigError(f"{source}: data.{key}={getattr(data, key)!r} is not used with data.layout="
                                  f"{data.layout!r}, which knows where its files are; remove data.{key}")


def _check_patches(patches: PatchesConfig, source: str) -> None:
    """``data.patches``: a crop size, counts and a fraction in range, a weight scheme the losses know."""
    checks = [
        ("size", patches.size, len(patches.size) == 2 and min(patches.size) >= 1, "[height, width] of positive ints"),
        ("per_epoch", patches.per_epoch, patches.per_epoch >= 1, "at least 1"),
        ("rare_fraction", patches.rare_fraction, 0 <= patches.rare_fraction <= 1, "in [0, 1]"),
        ("class_weight", patches.class_weight, patches.class_weight in WEIGHT_SCHEMES,
         f"one of {', '.join(WEIGHT_SCHEMES)}"),
        ("index_points", patches.index_points, patches.index_points >= 1, "at least 1"),
        ("max_pixels", patches.max_pixels, patches.max_pixels >= 1, "at least 1"),
    ]
    for key, value, valid, expected in checks:
        if not valid:
            raise ConfigError(f"{source}: data.patches.{key} must be {expected}, got {value!r}")


def _check_ranges(config: Config, source: str) -> None:
    """Values that would wreck training silently (a flipped gradient, NaN weights), checked before any step."""
    optim, schedule, loss, num_classes = config.optim, config.schedule, config.loss, config.data.num_classes
    ema = config.train.ema
    finite = math.isfinite
    checks = [
        ("optim.lr", optim.lr, finite(optim.lr) and optim.lr > 0, "a finite number > 0"),
        ("optim.weight_decay", optim.weight_decay, finite(optim.weight_decay) and optim.weight_decay >= 0,
         "a finite number >= 0"),
        ("optim.momentum", optim.momentum, 0 <= optim.momentum < 1, "in [0, 1)"),
        ("optim.betas", optim.betas, len(optim.betas) == 2 and all(0 <= beta < 1 for beta in optim.betas),
         "two numbers in [0, 1)"),
        ("schedule.warmup_iters", schedule.warmup_iters, schedule.warmup_iters >= 0, ">= 0"),
        ("schedule.power", schedule.power, finite(schedule.power) and schedule.power >= 0, "a finite number >= 0"),
        ("schedule.min_lr", schedule.min_lr, finite(schedule.min_lr) and 0 <= schedule.min_lr <= optim.lr,
         "in [0, optim.lr]"),
        ("train.grad_clip", config.train.grad_clip,
         config.train.grad_clip is None or (finite(config.train.grad_clip) and config.train.grad_clip > 0),
         "a finite number > 0, or null for no clipping"),
        ("train.ema.decay", ema and ema.decay, ema is None or 0 <= ema.decay < 1, "in [0, 1)"),
        ("train.ema.warmup", ema and ema.warmup, ema is None or ema.warmup >= 0, ">= 0"),
        ("loss.enet_c", loss.enet_c, finite(loss.enet_c) and loss.enet_c > 1,
         "a finite number > 1 (w = 1 / ln(c + f) must stay finite and positive)"),
        ("loss.effective_beta", loss.effective_beta, 0 < loss.effective_beta < 1, "in (0, 1)"),
    ]
    checks += _loss_option_checks("loss", loss, "weight", num_classes)
    for index, term in enumerate(loss.terms):
        checks += _term_checks(f"loss.terms[{index}]", term, num_classes, source)
    for key, value, valid, expected in checks:
        if not valid:
            raise ConfigError(f"{source}: {key} must be {expected}, got {value!r}")
    if loss.terms and not any(term.weight > 0 for term in loss.terms):
        raise ConfigError(f"{source}: loss.terms: every term has weight 0, so nothing would be trained")


def _loss_option_checks(prefix: str, options: Any, weight_key: str, num_classes: int) -> list:
    """(key, value, valid, expected) of the per-loss options of the loss section or of one term, whose
    class weights are ``weight_key``."""
    finite, weight = math.isfinite, getattr(options, weight_key)
    schemes = WEIGHT_SCHEMES + (("auto",) if weight_key == "class_weight" else ())
    checks = [
        (f"{prefix}.gamma", options.gamma, finite(options.gamma) and options.gamma >= 0, "a finite number >= 0"),
        (f"{prefix}.histogram_momentum", options.histogram_momentum,
         options.histogram_momentum is None or 0 <= options.histogram_momentum < 1, "in [0, 1), or null"),
        (f"{prefix}.{weight_key}", weight, not isinstance(weight, str) or weight in schemes,
         f"one of {', '.join(schemes)}, a list or null"),
    ]
    for key, values in ((weight_key, weight), ("alpha", options.alpha)):
        if isinstance(values, list):
            checks.append((f"{prefix}.{key}", values, len(values) == num_classes
                           and all(finite(v) and v >= 0 for v in values),
                           f"one finite value >= 0 per class (data.num_classes={num_classes})"))
    if isinstance(options.alpha, float):
        checks.append((f"{prefix}.alpha", options.alpha, 0 <= options.alpha <= 1,
                       "in [0, 1] (class 0 gets alpha, the others 1 - alpha)"))
    return checks


def _term_checks(prefix: str, term: LossTermConfig, num_classes: int, source: str) -> list:
    """The range checks of one ``loss.terms`` item; raise for a bad name or an option its loss does not take."""
    if term.name not in TERM_NAMES:
        found = f"got {term.name!r}" if term.name else "but it is missing"
        raise ConfigError(f"{source}: {prefix}.name must be one of {list(TERM_NAMES)}, {found}")
    defaults = LossTermConfig()
    for key, owners in TERM_OPTIONS.items():
        if term.name not in owners and getattr(term, key) != getattr(defaults, key):
            raise ConfigError(f"{source}: {prefix}.{key}={getattr(term, key)!r} applies to {' and '.join(owners)} "
                              f"terms only, and this term is {term.name}")
    finite = math.isfinite
    return _loss_option_checks(prefix, term, "class_weight", num_classes) + [
        (f"{prefix}.weight", term.weight, finite(term.weight) and term.weight >= 0, "a finite number >= 0"),
        (f"{prefix}.normalize", term.normalize, term.normalize in CHOICES["loss.normalize"],
         f"one of {list(CHOICES['loss.normalize'])}"),
        (f"{prefix}.smooth_nr", term.smooth_nr, finite(term.smooth_nr) and term.smooth_nr >= 0,
         "a finite number >= 0"),
        (f"{prefix}.smooth_dr", term.smooth_dr, finite(term.smooth_dr) and term.smooth_dr > 0,
         "a finite number > 0 (a sample without counted pixels divides by it)"),
    ]


def load_yaml_tree(path: Path, _seen: tuple = ()) -> Dict[str, Any]:
    """The merged dictionary of ``path`` and its ``_base_`` files."""
    try:
        path = path.resolve()
        found = path.is_file()
    except (OSError, ValueError) as error:  # e.g. a NUL byte or an over-long name
        raise ConfigError(f"invalid config path {str(path)!r}: {error}") from None
    if path in _seen:
        raise ConfigError(f"{path}: _base_ cycle through {' -> '.join(str(p) for p in _seen)}")
    if not found:
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as error:  # ValueError: e.g. a date 2001-13-45
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(base, str) and base for base in bases):
        raise ConfigError(f"{path}: _base_ must be a file name or a list of file names, got {bases!r}")
    merged: Dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml_tree(_base_path(path.parent, base), _seen + (path,)))
    return deep_merge(merged, data)


def _base_path(folder: Path, base: str) -> Path:
    """A ``_base_`` entry: the file relative to the config, else a shipped recipe of that name
    (``_base_/default.yaml``, ``camvid_unet_focal``), so a config copied anywhere keeps its bases."""
    relative = folder / base
    for candidate in (relative, RECIPES / base, RECIPES / f"{base}.yaml"):
        try:
            if candidate.is_file():
                return candidate
        except (OSError, ValueError):  # an over-long name or a NUL byte: load_yaml_tree names it
            break
    return relative


def _yaml_problem(error: Exception) -> str:
    """A YAML error in one line: the problem and where (PyYAML's own message spans several)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` updated by ``update``; nested mappings merge, other values replace."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


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
    node = raw
    *parents, leaf = parts
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def to_dict(config: Any) -> Dict[str, Any]:
    """The config as plain YAML-serialisable data."""
    return dataclasses.asdict(config)


def save_config(config: Config, path: Union[str, Path]) -> None:
    """Write the fully resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def from_dict(cls: type, data: Any, source: str = "config", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and ill-typed values."""
    where = f"{source}: {prefix.rstrip('.') or 'top level'}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
    values = {}
    for key, value in data.items():
        dotted = prefix + key
        values[key] = _convert(hints[key], value, source, dotted)
        allowed = CHOICES.get(dotted)
        if allowed is not None and values[key] not in allowed:
            raise ConfigError(f"{source}: {dotted} must be one of {list(allowed)}, got {value!r}")
    return cls(**values)


def _convert(hint: Any, value: Any, source: str, dotted: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, dotted + ".")
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, source, dotted)
            except ConfigError as error:
                errors.append(error)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{source}: {dotted} has an invalid value {value!r}")
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {dotted} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_convert(item, v, source, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {dotted} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(f"{source}: {dotted} is too large for a float, got {value!r}") from None
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{source}: {dotted} must be of type {getattr(hint, '__name__', hint)}, got {value!r}")
