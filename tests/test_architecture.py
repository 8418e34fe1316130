"""The shape of the code: qwen2's packages are layers, each importing only from the layers below it
(no circles), and the one table of quantised layer kinds is the one the C++ decode block switches on."""
import ast
import os
import re

import pytest

import qwen2

ROOT = os.path.dirname(qwen2.__file__)
# Lowest first. A module may import from lower layers only; packages sharing a layer may not import
# each other.
LAYERS = [
    ("qwen2.errors",),
    ("qwen2.progress", "qwen2.fileio"),
    ("qwen2.long_context",),  # configuration of the long-context methods: checks and presets
    ("qwen2.config", "qwen2.tokenizer"),
    ("qwen2.fim",),  # fill-in-the-middle prompts from a tokenizer's own FIM tokens
    ("qwen2.kernels",),
    ("qwen2.model",),
    ("qwen2.quant",),  # quantised linears, and the decoder's models quantised (an MoE block's experts too)
    ("qwen2.checkpoint",),
    ("qwen2.runtime",),
    ("qwen2.adapters",),  # LoRA adapters served per request: their files, the multi-adapter linear
    ("qwen2.options",),  # LoadOptions: how load builds a model, checked once (api, cli, serve, eval share it)
    ("qwen2.api",),
    ("qwen2.serve",),
    ("qwen2.eval",),
    ("qwen2.data",),  # pre-training data: corpora, tokenizer training, pipelines (decontaminated against eval's sets)
    ("qwen2.train",),
    ("qwen2.synth",),  # post-training data: rejection sampling, execution feedback
    ("qwen2.cli",),
    ("qwen2",),  # the package's own __init__: the public names
]


def modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = "qwen2" + path[len(ROOT):-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node, but not those under `if TYPE_CHECKING:` (annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports(known: dict[str, str]) -> dict[str, set[str]]:
    """module -> the qwen2 modules it imports, at module level or inside functions."""
    graph = {}
    for module, path in known.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        targets = set()
        for node in _runtime_nodes(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("qwen2")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if not source.startswith("qwen2"):
                    continue
                submodules = {f"{source}.{alias.name}" for alias in node.names} & known.keys()
                targets |= submodules or {source}
        graph[module] = {t for t in targets if t in known and t != module}
    return graph


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the package it belongs to) by the longest matching prefix."""
    best = None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (index, name)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def test_every_import_goes_down_a_layer():
    graph = imports(modules())
    wrong = []
    for module, targets in graph.items():
        layer, package = layer_of(module)
        for target in targets:
            target_layer, target_package = layer_of(target)
            if target_layer > layer or (target_layer == layer and target_package != package):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that go up (or sideways) a layer:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    graph = imports(modules())
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_the_layering_check_sees_a_circle_and_an_upward_import(monkeypatch, tmp_path):
    """The two checks above fail where they should: on a planted circle and an upward import."""
    package = tmp_path / "qwen2"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("from .model import cache\n")  # upward, and half a circle
    (package / "model" / "__init__.py").write_text("")
    (package / "model" / "cache.py").write_text("from ..errors import Qwen2Error\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(package))
    graph = imports(modules())
    assert graph["qwen2.errors"] == {"qwen2.model.cache"} and graph["qwen2.model.cache"] == {"qwen2.errors"}
    with pytest.raises(AssertionError, match="qwen2.errors -> qwen2.model.cache"):
        test_every_import_goes_down_a_layer()
    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circles()


def test_the_kernels_register_the_table_of_layer_kinds():
    """Every quantised layout of LAYER_KINDS is registered by a kernel file under its code and mode
    (`register_layer_kind`), nothing else is, and the decode block names no layout itself."""
    from qwen2.kernels import SOURCES
    from qwen2.quant import LAYER_KINDS
    from qwen2.quant.linear import QuantLinear

    sources = {os.path.basename(path): open(path, encoding="utf-8").read() for path in SOURCES}
    registered = [(int(code), mode) for source in sources.values()
                  for code, mode in re.findall(r'register_layer_kind\(\s*(\d+),\s*"([^"]+)"', source)]
    assert sorted(registered) == sorted((kind.code, kind.mode) for kind in LAYER_KINDS if kind.mode != "dense")
    assert not any(kind.linear_op in sources["decode_block.cpp"] for kind in LAYER_KINDS if kind.linear_op)
    dense = next(kind.code for kind in LAYER_KINDS if kind.mode == "dense")
    assert f"constexpr int64_t kDense = {dense};" in sources["decode_block.cpp"]  # the one kind it computes itself

    def subclasses(cls):
        return {cls} | {s for sub in cls.__subclasses__() for s in subclasses(sub)}

    modes = {cls.mode for cls in subclasses(QuantLinear) if cls.mode}
    assert modes <= {kind.mode for kind in LAYER_KINDS}, "a quantised layout without a row in LAYER_KINDS"
    ops = qwen2.kernels.ops()
    if ops is not None:  # every layout's op exists in the built kernels
        assert all(hasattr(ops, kind.linear_op) for kind in LAYER_KINDS if kind.linear_op)
