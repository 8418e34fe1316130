"""`--lora NAME=DIR` (repeatable): LoRA adapters served beside the model, as load's adapters= takes them."""
from __future__ import annotations

import argparse

from ..errors import Qwen2Error


def add_lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=None, metavar="NAME=DIR",
                   help="serve the LoRA adapter in DIR (what qwen2 train writes with lora=true, or an HF PEFT "
                        "directory) as model NAME: a request with \"model\": NAME uses it (repeatable)")


def lora_adapters(args) -> dict[str, str] | None:
    """{name: directory} from the --lora flags (None without any, or for a command without the flag); a
    malformed or repeated name is an error."""
    if not getattr(args, "lora", None):
        return None
    adapters: dict[str, str] = {}
    for flag in args.lora:
        name, sep, path = flag.partition("=")
        if not sep or not name.strip() or not path:
            raise Qwen2Error(f"--lora {flag!r}: give NAME=DIR, e.g. --lora sql=runs/sql-lora/adapter")
        if name in adapters:
            raise Qwen2Error(f"--lora names adapter {name!r} twice; give each adapter its own name")
        adapters[name] = path
    return adapters
