"""`qwen2 generate` / `qwen2 chat`'s structured-output flags: --json-schema, --regex, --grammar.
Files are read and JSON is parsed when the flags are read, before the model loads; the constraint
itself is compiled by `generate()` (qwen2/runtime/constrained.py), before any generation."""
from __future__ import annotations

import argparse
import json
import os

from ..errors import Qwen2Error


def add_structured_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured output (the reply is constrained token by token; pick one)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--json-schema", default=None, metavar="FILE_OR_JSON",
                   help="the reply is JSON valid under this schema: a .json file or the schema itself "
                        "('{\"type\": \"object\"}' for any object)")
    x.add_argument("--regex", default=None, help="the reply matches this regular expression as a whole")
    x.add_argument("--grammar", default=None, metavar="FILE", help="the reply is in this Lark grammar's language "
                   "(llguidance's dialect)")


def structured_options(args) -> dict:
    """generate()'s json_schema= / regex= / grammar= from the flags ({} when none is given)."""
    if args.json_schema is not None:
        return {"json_schema": _schema(args.json_schema)}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.grammar is not None:
        return {"grammar": _read(args.grammar, "--grammar")}
    return {}


def _schema(value: str) -> dict:
    text, source = value, "--json-schema"
    if os.path.isfile(value):
        text, source = _read(value, "--json-schema"), f"--json-schema file {value}"
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        if not text.lstrip().startswith(("{", "[")):
            raise Qwen2Error(f"--json-schema {value!r} is neither a file nor JSON; give a .json file or the schema "
                             "itself") from None
        raise Qwen2Error(f"{source} is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise Qwen2Error(f"{source} must be a JSON schema object ({{...}}), got {type(schema).__name__}")
    return schema


def _read(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise Qwen2Error(f"{flag}: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise Qwen2Error(f"{flag}: {path} is not UTF-8 text") from None
