"""`qwen2.LoadOptions`: one set of load options, checked once, shared by `qwen2.load`, the command line
(whose choices are the source's constants), the server and the lm-eval adapter."""
import argparse
import dataclasses

import pytest
import torch
from ggufs import random_model, save_random_model_dir, small_tokenizer_metadata, tiny_config

import qwen2
from qwen2 import LoadOptions, Qwen2Error, cli
from qwen2.data import PIPELINE_EXECUTORS
from qwen2.options import DTYPES, parse_arg_string
from qwen2.quant import GROUP_SIZES, MODES
from qwen2.runtime.executor import EXECUTORS
from qwen2.runtime.speculative import SPECULATIVE_METHODS
from qwen2.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return save_random_model_dir(tmp_path_factory.mktemp("options") / "tiny",
                                 Tokenizer.from_gguf_metadata(small_tokenizer_metadata()), tiny_config(vocab_size=264))


BAD = [  # (load's keywords, what the one-line error says)
    (dict(dtype="bf17"), "unknown dtype 'bf17'; use one of float32, fp32, bfloat16, bf16, float16, fp16"),
    (dict(device="gpu"), "unknown device 'gpu'"),
    (dict(progress="no"), "progress must be True or False, not 'no'"),
    (dict(quantize="int2"), "unknown quantization 'int2'; use one of int8, int4, int4-pure (or none)"),
    (dict(quantize="int8", group_size=32), "group_size applies to quantize='int4' (or 'int4-pure') only"),
    (dict(group_size=64), "group_size applies to quantize='int4'"),
    (dict(quantize="int4", group_size=48), "int4 group size must be one of 32, 64, 128, 256, not 48"),
    (dict(quantize="int4", quantize_lm_head="yes"), "quantize_lm_head must be True or False, not 'yes'"),
    (dict(quantize="int8", device="cuda"), "quantize='int8' runs on the CPU only, not cuda"),
    (dict(executor="fast"), "unknown executor 'fast'; use one of auto, native, eager, compiled"),
    (dict(compile=True, executor="eager"), "compile=True means executor='compiled', not 'eager'"),
    (dict(compile="yes"), "compile must be True or False"),
    (dict(expert_dtype="float16"), "experts can be stored in float32 or bfloat16, not float16"),
    (dict(expert_dtype="bf17"), "unknown dtype 'bf17'"),
    (dict(rope_scaling="ntk:2"), "rope scaling 'ntk:2' not understood; use yarn:FACTOR"),
    (dict(rope_scaling=4), "rope_scaling must be a string like 'yarn:4' or a dict, got 4"),
    (dict(dca=1), "DCA chunk size must be an integer >= 2, got 1"),
    (dict(dca="big"), "dca must be True, a chunk size or a dual_chunk_attention_config dict, got 'big'"),
    (dict(long_context="yes"), "long_context must be True or False, not 'yes'"),
    (dict(dca=4096, compile=True), "compile=True does not apply with Dual Chunk Attention"),
    (dict(long_context=True, executor="compiled"), "compile=True does not apply with Dual Chunk Attention"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[" ".join(f"{k}={v}" for k, v in kw.items()) for kw, _ in BAD])
def test_each_bad_option_is_a_one_line_error_before_any_weights_are_read(no_loading, tmp_path, kwargs, message):
    for make in (lambda: LoadOptions.from_kwargs(**kwargs), lambda: qwen2.load(str(tmp_path / "nothing"), **kwargs)):
        with pytest.raises(Qwen2Error) as error:
            make()
        assert message in str(error.value) and "\n" not in str(error.value)


def test_options_are_normal_once_made():
    o = LoadOptions(dtype="bf16", device="cpu", quantize="int4", expert_dtype="bfloat16")
    assert (o.dtype, o.device, o.quantize, o.group_size, o.expert_dtype) == \
        (torch.bfloat16, torch.device("cpu"), "int4", 32, torch.bfloat16)  # the default int4 group size, said
    assert o == LoadOptions(dtype=torch.bfloat16, device=torch.device("cpu"), quantize="int4", group_size=32,
                            expert_dtype=torch.bfloat16)
    assert LoadOptions(quantize="none").quantize is None and LoadOptions(quantize="int8").group_size is None
    assert LoadOptions.from_kwargs(compile=True).executor == "compiled"
    assert LoadOptions.from_kwargs(compile=True, executor="compiled").executor == "compiled"
    assert LoadOptions.from_kwargs(LoadOptions(quantize="int8"), progress=False) == \
        LoadOptions(quantize="int8", progress=False)
    assert LoadOptions(quantize="int8").replace(quantize="int4", group_size=64).group_size == 64
    with pytest.raises(Qwen2Error, match="group_size applies"):  # a change is checked like a new one
        LoadOptions(quantize="int4", group_size=64).replace(quantize="int8")
    with pytest.raises(TypeError, match="unexpected keyword argument 'quantise'"):  # as load's keywords always did
        qwen2.load("anything", quantise="int4")
    with pytest.raises(Qwen2Error, match="options must be a qwen2.LoadOptions, not str"):
        qwen2.load("anything", "bfloat16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoadOptions().dtype = torch.float16


# ---- load keeps its keywords, and the model keeps its options --------------------------------------

def test_load_keywords_and_options_build_the_same_model(tiny_dir):
    by_keywords = qwen2.load(tiny_dir, progress=False, quantize="int8", executor="eager")
    assert by_keywords.options == LoadOptions(progress=False, quantize="int8", executor="eager")
    by_options = qwen2.load(tiny_dir, LoadOptions(quantize="int8", executor="eager"), progress=False)
    assert by_options.options == by_keywords.options
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(by_keywords.model(ids), by_options.model(ids))
    assert qwen2.load(tiny_dir, progress=False, dtype="bf16").model.dtype == torch.bfloat16


def test_a_draft_model_is_loaded_with_the_targets_options(tiny_dir, monkeypatch):
    import qwen2.api

    target = qwen2.load(tiny_dir, progress=False, dtype="bfloat16")
    seen = []
    monkeypatch.setattr(qwen2.api, "load", lambda source, **kw: seen.append(kw["options"]) or target)
    assert target._load_draft("draft") is target and target._load_draft("draft") is target  # loaded once
    assert seen == [LoadOptions(dtype=torch.bfloat16, device="cpu", progress=False)]
    made = qwen2.Qwen2(target.model, target.tokenizer)  # made directly: its options are its model's
    assert made.options == LoadOptions(dtype=torch.bfloat16)


# ---- the command line ------------------------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser):
    """(command path, parser) of every (sub)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", p) for n, p in _subparsers(sub))


def _choices(parser: argparse.ArgumentParser, flag: str):
    found = [a for a in parser._actions if flag in a.option_strings]
    return tuple(found[0].choices) if found else None


def test_the_cli_choices_are_the_source_constants():
    commands = dict(_subparsers(cli.build_parser()))
    constants = {"--quantize": MODES, "--group-size": GROUP_SIZES, "--executor": EXECUTORS, "--dtype": tuple(DTYPES),
                 "--speculative": SPECULATIVE_METHODS}
    # `qwen2 data` verbs take --executor too: the datatrove executor their pipeline runs on, not the model's
    model_commands = {name: p for name, p in commands.items() if not name.startswith("data ")}
    for flag, constant in constants.items():
        having = {name: _choices(p, flag) for name, p in model_commands.items() if _choices(p, flag) is not None}
        assert having, f"no command has {flag}"
        assert set(having.values()) == {tuple(constant)}, (flag, having)
    pipelines = {name: _choices(p, "--executor") for name, p in commands.items() if name.startswith("data ")}
    assert set(pipelines.values()) - {None} == {PIPELINE_EXECUTORS}, pipelines
    for name in ("generate", "chat", "serve", "info", "eval humaneval", "eval perplexity", "eval passkey"):
        assert _choices(commands[name], "--quantize") == MODES, name
    for name in ("generate", "chat"):
        assert _choices(commands[name], "--speculative") == SPECULATIVE_METHODS
    for name in ("convert", "upcycle"):
        assert _choices(commands[name], "--dtype") == tuple(DTYPES)


def test_from_args_reads_the_flags_into_the_same_options():
    parse = cli.build_parser().parse_args
    args = parse(["generate", "x", "--dtype", "bf16", "--quantize", "int4", "--group-size", "64", "--executor", "eager",
                  "--rope-scaling", "yarn:4", "--dca", "4096", "--expert-dtype", "bfloat16"])
    assert LoadOptions.from_args(args) == LoadOptions(dtype=torch.bfloat16, quantize="int4", group_size=64,
                                                      executor="eager", rope_scaling="yarn:4", dca=4096,
                                                      expert_dtype=torch.bfloat16)
    assert LoadOptions.from_args(parse(["chat"])) == LoadOptions()
    assert LoadOptions.from_args(parse(["generate", "x", "--compile"])).executor == "compiled"
    assert LoadOptions.from_args(parse(["generate", "x", "--long-context"])) == LoadOptions(long_context=True)
    assert LoadOptions.from_args(parse(["serve", "--quantize", "int8"])) == LoadOptions(quantize="int8")
    assert LoadOptions.from_args(parse(["info", "--quantize", "int4-pure"])) == LoadOptions(quantize="int4-pure")
    assert LoadOptions.from_args(argparse.Namespace(model="m", dtype="float32")) == LoadOptions()  # flags it lacks


@pytest.mark.parametrize("flags, message", [
    (["--compile", "--executor", "eager"], "error: compile=True means executor='compiled', not 'eager'"),
    (["--quantize", "int8", "--group-size", "64"], "error: group_size applies to quantize='int4'"),
    (["--rope-scaling", "ntk:2"], "error: rope scaling 'ntk:2' not understood"),
    (["--dca", "1"], "error: DCA chunk size must be an integer >= 2, got 1"),
    (["--expert-dtype", "float16"], "error: experts can be stored in float32 or bfloat16, not float16"),
])
def test_cli_option_errors_are_one_line_before_loading(no_loading, tmp_path, capsys, flags, message):
    assert cli.main(["generate", "x", "-m", str(tmp_path / "nothing"), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_info_reads_its_flags_before_looking_for_the_model(no_loading, capsys):
    assert cli.main(["info", "no-such-model", "--compile", "--executor", "native"]) == 1
    assert capsys.readouterr().err.startswith("error: compile=True means executor='compiled', not 'native'")


def test_cli_rejects_a_choice_outside_the_constants(capsys):
    for flags in (["--quantize", "int2"], ["--group-size", "48"], ["--executor", "fast"], ["--dtype", "bf17"],
                  ["--speculative", "medusa"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["generate", "x", *flags])
        assert "invalid choice" in capsys.readouterr().err


# ---- the lm-eval adapter ---------------------------------------------------------------------------

def test_lm_eval_arguments_map_onto_the_same_options():
    text = "pretrained=some-model,dtype=bf16,quantize=int4,group_size=64,dca=true,executor=eager,max_length=128"
    own = ("pretrained", "max_length")
    expected = LoadOptions(dtype=torch.bfloat16, quantize="int4", group_size=64, dca=True, executor="eager")
    assert LoadOptions.from_lm_eval(text, own=own) == expected
    assert LoadOptions.from_lm_eval(parse_arg_string(text), own=own) == expected
    assert LoadOptions.from_lm_eval({"pretrained": "m", "quantize": "", "group_size": None, "device": None},
                                    own=own) == LoadOptions()  # empty values: the defaults, as before
    assert LoadOptions.from_lm_eval({"quantize": "int4", "group_size": "128"}) == LoadOptions(quantize="int4",
                                                                                              group_size=128)
    with pytest.raises(Qwen2Error, match="unknown model_args 'quantise'; qwen2 takes .*quantize"):
        LoadOptions.from_lm_eval("pretrained=m,quantise=int4", own=own)
    with pytest.raises(Qwen2Error, match="model_args item 'int4' is not key=value"):
        LoadOptions.from_lm_eval("pretrained=m,int4", own=own)


def test_lm_eval_reads_model_args_as_lm_eval_does():
    utils = pytest.importorskip("lm_eval.utils")
    text = "pretrained=/models/x,dtype=bfloat16,group_size=64,dca=True,long_context=false,rope_scaling=yarn:4," \
           "quantize=none,max_length=2048"
    assert parse_arg_string(text) == utils.simple_parse_args_string(text)


def test_the_lm_eval_adapter_loads_with_those_options(monkeypatch, no_loading):
    pytest.importorskip("lm_eval")
    import qwen2.api
    from qwen2.eval.lm_eval_adapter import Qwen2LM

    tiny = qwen2.Qwen2(random_model(tiny_config(vocab_size=264)), Tokenizer.from_gguf_metadata(small_tokenizer_metadata()),
                       source="tiny")
    seen = []
    monkeypatch.setattr(qwen2.api, "load", lambda source, **kw: seen.append((source, kw["options"])) or tiny)
    lm = Qwen2LM.create_from_arg_string("pretrained=some-model,dtype=bf16,quantize=int4,group_size=64,max_length=16",
                                        {"batch_size": 2, "max_batch_size": None, "device": "cpu"})
    assert seen == [("some-model", LoadOptions(dtype=torch.bfloat16, quantize="int4", group_size=64))]
    assert (lm.max_length, lm.batch_size) == (16, 2)
    with pytest.raises(Qwen2Error, match="unknown model_args 'quantise'"):
        Qwen2LM.create_from_arg_string("pretrained=some-model,quantise=int4")
    with pytest.raises(Qwen2Error, match="unknown quantization 'int2'"):
        Qwen2LM.create_from_arg_string("pretrained=some-model,quantize=int2")
    assert len(seen) == 1  # neither got as far as loading
    assert Qwen2LM(pretrained=tiny).m is tiny  # a loaded model as it is
