"""Draw docs/architecture.png: qwen2's layers, lowest at the bottom, and the path of a chat request
through them (see docs/ARCHITECTURE.md). The layer order is tests/test_architecture.py's LAYERS.

    python3 docs/draw_architecture.py            # writes docs/architecture.png (1400 px wide)
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "architecture.png")

# (packages, what lives there, colour group), lowest layer first, as tests/test_architecture.py's LAYERS.
LAYERS = [
    ("qwen2.errors", "Qwen2Error: one-line errors", "base"),
    ("qwen2.progress  qwen2.fileio", "progress bars, notices; atomic writes, cache dir", "base"),
    ("qwen2.long_context", "YaRN / DCA / sliding-window config: checks, presets", "base"),
    ("qwen2.config  qwen2.tokenizer", "Qwen2Config; byte-level BPE, chat template", "base"),
    ("qwen2.kernels", "C++ ops, built at first use: torch.ops.qwen2_kernels", "compute"),
    ("qwen2.model  |  qwen2.quant", "decoder, caches, RoPE, DCA, MoE  |  quantised linears, LAYER_KINDS",
     "compute"),
    ("qwen2.checkpoint", "registry, HF safetensors, GGUF reader, build_model, upcycle", "assembly"),
    ("qwen2.runtime", "executors (eager/native/compiled), generate, speculative", "assembly"),
    ("qwen2.options", "LoadOptions: the load options, parsed and validated once", "assembly"),
    ("qwen2.api", "qwen2.load composes it all; the Qwen2 object", "assembly"),
    ("qwen2.serve", "FastAPI app, continuous-batching Engine", "apps"),
    ("qwen2.eval", "HumanEval sandbox, perplexity, passkey, answers, lm-eval", "apps"),
    ("qwen2.data", "pre-training data: corpora, tokenizer training, datatrove pipelines", "apps"),
    ("qwen2.train", "pretrain, SFT, LoRA, DPO, online DPO", "apps"),
    ("qwen2.synth", "post-training data: rejection sampling, execution feedback", "apps"),
    ("qwen2.cli", "the `qwen2` command", "apps"),
    ("qwen2", "public names: load, Qwen2, LoadOptions, ...", "public"),
]
COLOURS = {"base": "#eceff1", "compute": "#e3f2e1", "assembly": "#e1ecf7", "apps": "#fdf3dc", "public": "#ece4f5"}
EDGES = {"base": "#90a4ae", "compute": "#66a35e", "assembly": "#5b8cc0", "apps": "#c9a44a", "public": "#9575cd"}

X0, X1 = 0.4, 9.55  # the layer boxes
Y0, H = 0.35, 0.78  # bottom of layer 0, row height
CHAT, SERVE, LOAD = "#1f5fa8", "#d2691e", "#7a7a7a"


def y_of(layer: int) -> float:
    return Y0 + layer * H + H / 2


def layer_index(name: str) -> int:
    return next(i for i, (packages, _, _) in enumerate(LAYERS) if name in packages.split())


# The path, as (label, layer, x): the stops of `qwen2 chat "..."` in order, then the server's.
CHAT_STOPS = [
    ("1", "qwen2.cli", 5.35),
    ("2", "qwen2.options", 5.35),
    ("3", "qwen2.api", 5.95),
    ("4", "qwen2.checkpoint", 5.95),
    ("5", "qwen2.quant", 5.95),
    ("6", "qwen2.kernels", 5.95),
    ("7", "qwen2.runtime", 6.6),
    ("8", "qwen2.api", 7.25),
    ("9", "qwen2.tokenizer", 6.8),
    ("10", "qwen2.runtime", 7.7),
    ("11", "qwen2.model", 8.0),
    ("12", "qwen2.runtime", 8.3),
    ("13", "qwen2.kernels", 8.6),
    ("14", "qwen2.model", 8.9),
    ("15", "qwen2.runtime", 9.2),
    ("16", "qwen2.cli", 9.2),
]
LOADING = 7  # stops 1..7 load the model, once per process
SERVE_STOPS = [("S1", "qwen2.serve", 7.75), ("S2", "qwen2.serve", 8.5)]

STEPS_CHAT = [
    ("1", "cli: cmd_chat → model_args.load_model"),
    ("2", "options: LoadOptions.from_args, checked once"),
    ("3", "api.load(source, options)"),
    ("4", "checkpoint: load_checkpoint → build_model"),
    ("5", "checkpoint.quantized: build_quantized"),
    ("6", "kernels.ops(): C++ ops built once"),
    ("7", "runtime.executor.make_decoder → Qwen2"),
    ("8", "Qwen2.chat → Qwen2.generate"),
    ("9", "tokenizer.apply_chat_template, encode"),
    ("10", "generate.stream_rows → decode_steps\n     → decoder(ids, cache)"),
    ("11", "Transformer.prepare: embed, RoPE, masks"),
    ("12", "NativeDecoder.blocks"),
    ("13", "torch.ops.qwen2_kernels.decode_layers"),
    ("14", "Transformer.finish: norm, lm_head"),
    ("15", "next_token → TextStream.push"),
    ("16", "text printed as it streams"),
]
STEPS_SERVE = [
    ("S1", "POST /v1/chat/completions: app.chat_completions\n     (apply_chat_template, encode) → Job"),
    ("S2", "engine.Engine: admit (prefill alone), decode\n     every live row in one StaticKV step"),
    ("", "   → the same decoder (10-14);\n     each row: its own next_token"),
]


def stop_xy(stop) -> tuple[float, float]:
    _, layer, x = stop
    return x, y_of(layer_index(layer))


def draw_stop(ax, stop, colour) -> None:
    x, y = stop_xy(stop)
    ax.add_patch(Circle((x, y), 0.2, facecolor=colour, edgecolor="white", linewidth=1.5, zorder=5))
    ax.text(x, y, stop[0], ha="center", va="center", color="white", fontsize=8.5 if len(stop[0]) > 1 else 10,
            fontweight="bold", zorder=6)


def arrow(ax, a, b, colour, rad=0.0, style="-", width=1.6) -> None:
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=13, color=colour, linewidth=width,
                                 linestyle=style, shrinkA=11, shrinkB=11, zorder=4,
                                 connectionstyle=f"arc3,rad={rad}"))


def main() -> None:
    top = Y0 + len(LAYERS) * H + 1.0  # room for the title
    fig = plt.figure(figsize=(14, top), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 14)
    ax.set_ylim(0, top)
    ax.axis("off")

    ax.text(0.2, top - 0.35, "qwen2: layers (imports only go down) and the path of a chat request",
            fontsize=15, fontweight="bold", va="center")
    ax.text(0.2, top - 0.72, "Lowest layer at the bottom; order = tests/test_architecture.py LAYERS. "
            "Packages sharing a row may not import each other.", fontsize=10, color="#444", va="center")

    for i, (packages, what, group) in enumerate(LAYERS):
        y = Y0 + i * H
        ax.add_patch(FancyBboxPatch((X0, y + 0.05), X1 - X0, H - 0.1, boxstyle="round,pad=0,rounding_size=0.08",
                                    facecolor=COLOURS[group], edgecolor=EDGES[group], linewidth=1.2, zorder=1))
        ax.text(X0 + 0.15, y + H / 2 + 0.13, packages, fontsize=11, fontweight="bold", va="center",
                family="DejaVu Sans Mono", zorder=2)
        ax.text(X0 + 0.15, y + H / 2 - 0.17, what, fontsize=8.6, color="#333", va="center", zorder=2)
        ax.text(X0 - 0.05, y + H / 2, str(i), fontsize=8, color="#888", ha="right", va="center")

    # load path (once): dashed grey; chat request: blue; server: orange
    for a, b in zip(CHAT_STOPS[:LOADING], CHAT_STOPS[1:LOADING + 1]):
        arrow(ax, stop_xy(a), stop_xy(b), LOAD, style="--")
    for a, b in zip(CHAT_STOPS[LOADING:], CHAT_STOPS[LOADING + 1:]):
        arrow(ax, stop_xy(a), stop_xy(b), CHAT)
    arrow(ax, stop_xy(SERVE_STOPS[0]), stop_xy(SERVE_STOPS[1]), SERVE)
    arrow(ax, stop_xy(SERVE_STOPS[1]), stop_xy(CHAT_STOPS[9]), SERVE, rad=-0.15)
    for stop in CHAT_STOPS[:LOADING]:
        draw_stop(ax, stop, LOAD)
    for stop in CHAT_STOPS[LOADING:]:
        draw_stop(ax, stop, CHAT)
    for stop in SERVE_STOPS:
        draw_stop(ax, stop, SERVE)

    # the numbered steps, beside the layers
    px, py = 9.85, Y0 + len(LAYERS) * H - 0.3
    ax.text(px, py, "qwen2 chat \"...\"", fontsize=11.5, fontweight="bold", color=CHAT, va="center",
            family="DejaVu Sans Mono")
    ax.text(px, py - 0.32, "grey, dashed: loading, once per process", fontsize=8.6, color=LOAD, va="center")
    py -= 0.72
    for number, text in STEPS_CHAT:
        colour = LOAD if int(number) <= LOADING else CHAT
        ax.text(px, py, f"{number:>2}", fontsize=9.5, fontweight="bold", color=colour, va="top",
                family="DejaVu Sans Mono")
        ax.text(px + 0.33, py, text, fontsize=9.5, va="top", family="DejaVu Sans")
        py -= 0.33 * (1 + text.count("\n"))
    py -= 0.3
    ax.text(px, py, "POST /v1/chat/completions", fontsize=11.5, fontweight="bold", color=SERVE, va="top",
            family="DejaVu Sans Mono")
    py -= 0.42
    for number, text in STEPS_SERVE:
        ax.text(px, py, number, fontsize=9.5, fontweight="bold", color=SERVE, va="top", family="DejaVu Sans Mono")
        ax.text(px + 0.33, py, text, fontsize=9.5, va="top")
        py -= 0.33 * (1 + text.count("\n"))

    fig.savefig(OUT, dpi=100, facecolor="white")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
