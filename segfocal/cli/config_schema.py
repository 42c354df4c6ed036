"""The config's JSON Schema, for editors that check and complete YAML recipes as you type.

    segfocal config-schema [--output segfocal.schema.json]

The same schema ships inside the package (``segfocal/config/schema.json``). Put
``# yaml-language-server: $schema=segfocal.schema.json`` (a path relative to the recipe, or a URL) on
a recipe's first line, and an editor with a YAML language server completes its keys, shows what each
means and marks a wrong type or range.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", help="write the schema to this file (default: print it)")


def run(args: argparse.Namespace) -> None:
    from ..config.json_schema import config_json_schema_text
    from ..files import replaced_atomically

    text = config_json_schema_text()
    if not args.output:
        print(text, end="")
        return
    with replaced_atomically(Path(args.output)) as handle:
        handle.write(text.encode())
    print(f"wrote {args.output}")
