"""Config errors in one line that names the file, the key and the value: pydantic's validation
errors turned into the sentences a user reads (``data.batch_size must be at least 1, got 0``),
with the closest valid key suggested for an unknown one.

The key, the expected type or range and the hint come from the schema itself (its field types,
bounds and descriptions), so a new field's errors read like the others with nothing written here.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, List, Literal, Optional, Tuple, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from typing_extensions import Annotated


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names it."""


def config_error(error: ValidationError, model: type, source: str,
                 set_keys: Optional[Dict[str, str]] = None) -> ConfigError:
    """The first of ``error``'s problems with a ``model`` built from the file ``source``, as one line. A key
    that a ``--set`` override set (or lies under one), ``set_keys`` (dotted key -> the override's words), is
    blamed on that override, not on the file."""
    problems = error.errors(include_url=False)
    first = _Place.of(model, problems[0]["loc"])
    # a value of a union type fails once per member: read it as the member its value's kind chooses
    members = [problem for problem in problems if _Place.of(model, problem["loc"]).key == first.key]
    for key, words in (set_keys or {}).items():
        if first.key == key or first.key.startswith((f"{key}.", f"{key}[")):
            source = words
    return ConfigError(f"{source}: {_sentence(model, _chosen(model, members))}")


class _Place:
    """Where an error's location leads in the schema: the dotted key, the type and bounds found there,
    the field's description, and the location's rest (a union member's tag and below)."""

    def __init__(self, key: str, annotation: Any, bounds: list, description: Optional[str], rest: tuple) -> None:
        self.key, self.annotation, self.bounds, self.description, self.rest = key, annotation, bounds, description, rest

    @classmethod
    def of(cls, annotation: Any, loc: tuple, key: str = "", description: Optional[str] = None) -> "_Place":
        bounds: list = []
        for index, part in enumerate(loc):
            annotation, more = _unwrapped(annotation)
            bounds += more
            if is_model(annotation) and part in annotation.model_fields:
                info = annotation.model_fields[part]
                key, description = f"{key}.{part}" if key else str(part), info.description
                annotation, bounds = info.annotation, list(info.metadata)
            elif get_origin(annotation) is list and isinstance(part, int):
                key, annotation, bounds = f"{key}[{part}]", get_args(annotation)[0], []
            elif get_origin(annotation) is dict and loc[index + 1:index + 2] == ("[key]",):  # the key is wrong
                key_type, key_bounds = _unwrapped(get_args(annotation)[0])
                return cls(f"{key} key", key_type, key_bounds, description, ())
            elif get_origin(annotation) is dict:
                key, annotation, bounds = f"{key}[{part!r}]", get_args(annotation)[1], []
            else:
                return cls(key, annotation, bounds, description, loc[index:])
        annotation, more = _unwrapped(annotation)
        return cls(key, annotation, bounds + more, description, ())


def _chosen(model: type, problems: List[dict]) -> dict:
    """Of the errors of one union-typed value, the one of the member that its kind of value (a list,
    a string, a number) belongs to; when no member fits, the first, which names the whole union."""
    value = problems[0]["input"]
    for problem in problems:
        place = _Place.of(model, problem["loc"])
        if place.rest and _member_fits(place, value):
            return problem
    return problems[0]


def _member_fits(place: _Place, value: Any) -> bool:
    tag = str(place.rest[0])
    if isinstance(value, list):
        return tag.startswith("list")
    if isinstance(value, str):
        return tag.startswith(("literal", "str"))
    return isinstance(value, (int, float)) and not isinstance(value, bool) and tag.startswith(("float", "int",
                                                                                                "constrained"))


def _member_of_tag(members: tuple, tag: str) -> Any:
    """The member of a union that pydantic's location tag (``list[...]``, ``literal[...]``, ``float``) names."""
    for member in members:
        bare, _ = _unwrapped(member)
        origin = get_origin(bare)
        if ((tag.startswith("list") and origin is list) or (tag.startswith("literal") and origin is Literal)
                or (tag.startswith(("float", "int", "constrained", "str")) and origin is None
                    and bare is not type(None))):
            return member
    return None


def _sentence(model: type, problem: dict) -> str:
    if problem["type"] == "extra_forbidden":
        return _unknown_key(model, problem["loc"])
    place = _Place.of(model, problem["loc"])
    if place.rest:  # a value of a union type: within the member its kind chose, or the whole union
        member = _member_of_tag(union_members(place.annotation), str(place.rest[0]))
        if member is None or len(place.rest) == 1:
            return f"{place.key} must be {_kind(place.annotation, place.bounds)}, got {problem['input']!r}"
        place = _Place.of(member, place.rest[1:], place.key, place.description)
    kind, key, value = problem["type"], place.key, problem.get("input")
    if kind == "missing":
        return f"{key} must be {_kind(place.annotation, place.bounds)}, but it is missing"
    if kind == "value_error":
        message = problem["msg"].removeprefix("Value error, ")
        return message if is_model(place.annotation) or not key else f"{key} {message}, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                "too_short", "too_long"):
        return f"{key} must be {_kind(place.annotation, place.bounds)}, got {value!r}"
    if kind == "literal_error":
        return f"{key} must be one of {list(get_args(place.annotation))}, got {value!r}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{key or 'top level'} must be a mapping, got {value!r}"
    if kind == "list_type":
        return f"{key} must be a list, got {value!r}"
    if kind in ("int_type", "float_type", "bool_type", "string_type", "int_from_float"):
        name = getattr(place.annotation, "__name__", place.annotation)
        return f"{key} must be of type {name}, got {value!r}"
    return f"{key} has an invalid value {value!r}: {problem['msg']}"


def _unknown_key(model: type, loc: tuple) -> str:
    parent = _Place.of(model, loc[:-1])
    prefix = f"{parent.key}." if parent.key else ""
    fields = list(parent.annotation.model_fields) if is_model(parent.annotation) else []
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
    return f"unknown key '{prefix}{loc[-1]}'{hint}"


def _kind(annotation: Any, bounds: list) -> str:
    """What a value of ``annotation`` with ``bounds`` is, in words: ``a finite number > 0``, ``in [0, 1)``,
    ``at least 1``, ``one of a, b, a list or null``."""
    annotation, more = _unwrapped(annotation)
    bounds = bounds + more
    members = union_members(annotation)
    if len(members) > 1:
        words = [_kind(member, []) for member in members if member is not type(None)]
        words += ["null"] if type(None) in members else []
        return ", ".join(words[:-1]) + " or " + words[-1]
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(choice) for choice in get_args(annotation))
    if get_origin(annotation) is list:
        size = [getattr(b, "min_length", None) for b in bounds] + [getattr(b, "max_length", None) for b in bounds]
        count = next((n for n in size if n is not None), None)
        items = _kind(get_args(annotation)[0], [])
        return f"{count} items, each {items}" if count else "a list"
    low, high = _bound(bounds, ("gt", ">"), ("ge", ">=")), _bound(bounds, ("lt", "<"), ("le", "<="))
    if annotation is int:
        if low and not high:
            return f"at least {low[1] + (low[0] == '>')}"
        return f"an integer in [{low[1]}, {high[1]}]" if low and high else "an integer"
    if annotation is float:
        if low and high:
            return f"in {'(' if low[0] == '>' else '['}{low[1]}, {high[1]}{')' if high[0] == '<' else ']'}"
        return f"a finite number {low[0]} {low[1]}" if low else "a finite number"
    return getattr(annotation, "__name__", str(annotation))


def _bound(bounds: list, *kinds: Tuple[str, str]) -> Optional[Tuple[str, Any]]:
    """The first of ``kinds`` (attribute, sign), e.g. ``("gt", ">")``, that a bound sets, as (sign, value)."""
    return next(((sign, getattr(bound, name)) for name, sign in kinds for bound in bounds
                 if getattr(bound, name, None) is not None), None)


def _unwrapped(annotation: Any) -> Tuple[Any, list]:
    """``annotation`` without ``Annotated`` (its bounds returned apart) and without ``Optional``'s None."""
    bounds: list = []
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            for item in extra:
                bounds += list(getattr(item, "metadata", [item]))
            continue
        members = [m for m in union_members(annotation) if m is not type(None)]
        if get_origin(annotation) is Union and len(members) == 1:
            annotation = members[0]
            continue
        return annotation, bounds


def union_members(annotation: Any) -> tuple:
    """The members of a ``Union`` (``Optional``) type, or the type alone."""
    return get_args(annotation) if get_origin(annotation) is Union else (annotation,)


def is_model(annotation: Any) -> bool:
    """Whether ``annotation`` is a pydantic model: a config section."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
