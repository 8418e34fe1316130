"""Training checkpoints, without pickle: tensors in safetensors, everything else in JSON.

    output_dir/checkpoints/step-00000100/
        model.safetensors      trained parameters (all of them, or only the LoRA adapters)
        optimizer.safetensors  AdamW moments and step counts, keyed `state.<param index>.<name>`
        rng.safetensors        torch CPU (and CUDA) generator states
        state.json             step, data position, optimizer param groups, Python RNG, options

A checkpoint is written into a temporary sibling directory and renamed into place when complete,
so a run killed at any moment leaves either the whole checkpoint or none of it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch

from ..errors import Qwen2Error
from ..fileio import atomic_dir
from .distributed import barrier, full_tensor, shard_like

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, CHECKPOINTS, f"step-{step:08d}")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first (temporary `.partial` ones are ignored)."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := _NAME.match(n))]
    return sorted(found)


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters training changes, by name (a tied lm_head is listed once, as the embedding)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {f"state.{index}.{key}": full_tensor(value.detach()).contiguous()
               for index, entries in state["state"].items() for key, value in entries.items()}
    return tensors, state["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state's index order
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        param = params[int(index)]
        # FSDP2: the moments of a sharded parameter are sharded like it
        state.setdefault(int(index), {})[name] = shard_like(value, param) if value.shape == param.shape else value
    for group in groups:  # JSON turned the betas tuple into a list
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor], python_state) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(output_dir: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int, write: bool = True) -> str:
    """Write checkpoint `step` atomically; keep the `keep` most recent ones. `state` is JSON data
    (data position, counters, options). Distributed, every rank calls it (FSDP2 shards are gathered
    in full, a collective) and only the one with `write` writes."""
    from safetensors.torch import save_file

    final = checkpoint_dir(output_dir, step)
    weights = {k: full_tensor(v.detach()).contiguous() for k, v in trainable_tensors(model).items()}
    opt_tensors, groups = optimizer_tensors(optimizer)
    if not write:
        barrier()
        return final
    with atomic_dir(final) as tmp:  # a re-run of a step after resuming from an older checkpoint replaces it
        save_file(weights, os.path.join(tmp, "model.safetensors"))
        save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        save_file(rng_tensors(), os.path.join(tmp, "rng.safetensors"))
        full_state = dict(state, step=step, optimizer_param_groups=groups, python_rng=random.getstate())
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(full_state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    barrier()  # no rank runs ahead of a checkpoint it may be asked to resume from
    return final


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model parameters, optimizer and RNG from checkpoint directory `path`; return its state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        weights = load_file(os.path.join(path, "model.safetensors"))
        opt_tensors = load_file(os.path.join(path, "optimizer.safetensors"))
        rng = load_file(os.path.join(path, "rng.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise Qwen2Error(f"checkpoint {path} is unreadable ({e}); remove it to resume from the one before") from None
    params = trainable_tensors(model)
    if set(weights) != set(params):
        raise Qwen2Error(f"checkpoint {path} holds other parameters than this model trains "
                         "(a different model, or lora on/off?); resume with the options it was written with")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(shard_like(weights[name], p))
    restore_optimizer(optimizer, opt_tensors, state["optimizer_param_groups"])
    restore_rng(rng, state["python_rng"])
    return state
