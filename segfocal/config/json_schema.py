"""The config's JSON Schema, made from the models, for editors that check and complete YAML recipes.

It ships as ``segfocal/config/schema.json`` (kept equal to the models by the test suite; another
pydantic release may write the same schema in another form, so the file names the one that wrote it) and is
printed by ``segfocal config-schema``. A recipe's first line ``# yaml-language-server: $schema=<file>``
points the YAML language server (VS Code's YAML extension, and others) at it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import pydantic

from .schema import Config

SCHEMA_FILE = Path(__file__).with_name("schema.json")


def config_json_schema() -> Dict[str, Any]:
    """The JSON Schema of a config file: :class:`Config`'s, plus the ``_base_`` key a file may start with."""
    schema = Config.model_json_schema()
    schema["title"] = "segfocal config"
    schema["$comment"] = f"made by pydantic {pydantic.VERSION} from segfocal.config.schema"
    schema["properties"] = {"_base_": {
        "description": "config files merged first, in order (relative to this file, else recipes shipped with "
                       "segfocal); sections merge, values replace",
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}, **schema["properties"]}
    return schema


def config_json_schema_text() -> str:
    """:func:`config_json_schema` as the shipped file's text."""
    return json.dumps(config_json_schema(), indent=2, sort_keys=True) + "\n"
