"""Seeded JSON schemas for structured output's tests and benchmark: nested objects, arrays with
minItems/maxItems, enums, integers and numbers with ranges, required and optional properties,
`anyOf`, const, booleans and null, strings with or without a length bound. Every object closes
its properties (additionalProperties false), as OpenAI's strict mode requires.

`random_schema(rng)` is one top-level object schema; `fuzzed_schemas(n, seed)` is n of them, the
same n for the same seed. `max_string_length`: a bound for every string (what a random model, which
rarely writes a closing quote, needs to finish); None leaves a third of them unbounded.
"""
from __future__ import annotations

import random

WORDS = ["name", "age", "city", "tags", "score", "active", "items", "id", "kind", "price", "count", "email",
         "color", "size", "level", "notes", "owner", "status", "x", "y", "unit", "lang", "title", "rank"]
ENUM_WORDS = ["red", "green", "blue", "small", "large", "yes", "no", "alpha", "beta", "on", "off", "cat", "dog"]
LEAVES = ["integer", "number", "string", "boolean", "enum", "null", "const"]
NODES = ["array", "object", "anyOf"]


def fuzzed_schemas(n: int, seed: int = 0, max_string_length: int | None = None) -> list[dict]:
    rng = random.Random(seed)
    return [random_schema(rng, max_string_length) for _ in range(n)]


def random_schema(rng: random.Random, max_string_length: int | None = None) -> dict:
    return _object(rng, 0, max_string_length, rng.randint(1, 4))


def _object(rng, depth: int, bound, n_properties: int) -> dict:
    names = rng.sample(WORDS, n_properties)
    properties = {name: _value(rng, depth + 1, bound) for name in names}
    required = [name for name in names if rng.random() < 0.7]
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _value(rng, depth: int, bound) -> dict:
    kind = rng.choice(LEAVES + (NODES if depth < 3 else []))
    if kind == "integer":
        low = rng.randint(-50, 50)
        schema = {"type": "integer"}
        if rng.random() < 0.8:
            schema["minimum"] = low
        if rng.random() < 0.8:
            schema["maximum"] = low + rng.randint(0, 1000)
        return schema
    if kind == "number":
        low = round(rng.uniform(-100, 100), 2)
        return {"type": "number", "minimum": low, "maximum": round(low + rng.uniform(0.5, 500), 2)}
    if kind == "string":
        schema = {"type": "string"}
        if bound is not None or rng.random() < 2 / 3:
            schema["maxLength"] = rng.randint(1, bound or 24)
            if rng.random() < 0.3:
                schema["minLength"] = rng.randint(0, schema["maxLength"])
        return schema
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "enum":
        values = rng.sample(ENUM_WORDS, rng.randint(2, 4))
        if rng.random() < 0.3:
            values = values[:-1] + [rng.randint(0, 9)]
        return {"enum": values}
    if kind == "const":
        return {"const": rng.choice(ENUM_WORDS)}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": _value(rng, depth + 1, bound), "minItems": low,
                "maxItems": low + rng.randint(0, 3)}
    if kind == "object":
        return _object(rng, depth, bound, rng.randint(1, 3))
    first, second = rng.sample(["integer", "string", "boolean", "null", "enum"], 2)  # anyOf of two kinds
    return {"anyOf": [_leaf(rng, first, bound), _leaf(rng, second, bound)]}


def _leaf(rng, kind: str, bound) -> dict:
    while True:
        schema = _value(rng, 99, bound)  # depth 99: leaves only
        if kind in (schema.get("type"), "enum" if "enum" in schema else None):
            return schema
