"""The issue-4 experiments' own logic (benchmarks/experiments/long_context_extrapolation.py and
passkey.py, imported as package modules) and the corpus they share (benchmarks/common.py): the settings
they evaluate are the ones they name, and the passkey bookkeeping (resume, merge, memory check) is
right. Fast: no training, no real model."""
import json

import pytest
import torch

from benchmarks import common
from benchmarks.experiments import long_context_extrapolation as extrap
from benchmarks.experiments import passkey
from qwen2 import long_context as lc
from qwen2.model import Transformer


def test_extrapolation_settings_are_what_they_say():
    base = extrap.model_config()
    plain = extrap.setting_config(base, "rope", 4096)
    assert plain.rope_scaling is None and plain.dual_chunk_attention_config is None
    yarn = extrap.setting_config(base, "yarn", 2048)
    assert yarn.rope_scaling["factor"] == 8 and lc.trained_length(yarn) == 256
    assert extrap.setting_config(base, "yarn", 256).rope_scaling is None  # factor 1 is plain RoPE
    both = extrap.setting_config(base, "yarn+dca", 1024)
    assert both.rope_scaling["factor"] == 4
    assert both.dual_chunk_attention_config == {"chunk_size": 256, "local_size": 8, "original_max_position_embeddings": 256}
    assert extrap.setting_config(base, "yarn4+dca", 256).rope_scaling["factor"] == 4
    for setting in extrap.SETTINGS:  # every setting runs the longest evaluation length
        assert lc.context_length(extrap.setting_config(base, setting, 4096)) >= 4096


def test_extrapolation_model_round_trip_and_dca_within_one_chunk(tmp_path):
    torch.manual_seed(0)
    config = extrap.model_config()
    model = Transformer(config).eval()
    extrap.save_model(model, config, str(tmp_path))
    loaded, loaded_config = extrap.load_model(str(tmp_path))
    ids = torch.randint(0, config.vocab_size, (1, 200))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
        # DCA with chunk 256 leaves a sequence shorter than L = 248 exactly as plain RoPE has it
        dca = Transformer(extrap.setting_config(loaded_config, "dca", 512)).eval()
        dca.load_state_dict(loaded.state_dict())
        torch.testing.assert_close(dca(ids), model(ids), rtol=0, atol=1e-4)
        ppl, windows = extrap.perplexity(model, ids[0], 100, 1000)
    assert windows == 2 and ppl > 1


def test_plain_text_drops_markdown():
    md = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \nStand_fast.\n"
    assert common.plain_text(md) == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\nStand_fast.\n"


def _run(setting, length, depth, peak, warm=2000.0, tokens=None):
    return {"setting": setting, "length": length, "depth": depth, "seed": 0, "tokens": tokens or length,
            "answer": "12345", "reply": "12345", "correct": depth < 1, "seconds": 1.0, "peak_rss_mb": peak,
            "rss_loaded_mb": 300.0, "rss_warm_mb": warm, "device": "cpu", "quantize": None, "threads": 1}


def test_passkey_merge_report_and_memory_check(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (tmp_path / "a.json").write_text(json.dumps({"model": "m", "max_new_tokens": 16, "runs": [
        _run("plain", 4096, 0.0, 2400.0), _run("plain", 4096, 1.0, 2500.0)]}))
    (tmp_path / "b.json").write_text(json.dumps({"model": "m", "max_new_tokens": 16, "runs": [
        _run("plain", 4096, 0.0, 9999.0), _run("plain", 8192, 0.0, 3000.0)]}))
    passkey.merge(str(a), [str(tmp_path / "b.json")])
    runs = json.loads((tmp_path / "a.json").read_text())["runs"]
    assert [(r["length"], r["depth"], r["peak_rss_mb"]) for r in runs] == [(4096, 0.0, 2400.0), (4096, 1.0, 2500.0),
                                                                          (8192, 0.0, 3000.0)]  # a's run kept
    md = (tmp_path / "a.md").read_text()
    assert "| 4096 | 1/1 | 0/1 | 1/2 |" in md and (tmp_path / "a.png").stat().st_size > 0
    # memory added per 1K tokens: (2500 - 2000) / 4 from the warm weights, then (3000 - 2500) / 4
    rows = passkey.memory_rows(runs)
    assert rows[2].endswith("| 125.0 |") and rows[3].endswith("| 125.0 |")


def test_passkey_plain_prompt_fits_its_context():
    assert passkey.prompt_tokens("plain", 32768, 16) == 32752
    assert passkey.prompt_tokens("long", 32768, 16) == 32768
    assert passkey.prompt_tokens("plain", 4096, 16) == 4096


def test_passkey_bad_setting_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        passkey.main(["--settings", "plain,bogus"])
    assert e.value.code == 1 and "unknown setting 'bogus'" in capsys.readouterr().err
