"""Training: pre-training, SFT, LoRA, offline and online DPO, reward models, in one process or many (torchrun).

    import qwen2.train
    result = qwen2.train.sft("sft.toml", max_steps=200)   # or a TrainConfig, or a dict of options
    result.log[-1]["loss"], result.model_dir

The same from the shell: `qwen2 train sft --config sft.toml max_steps=200`.
"""
from .config import TrainConfig, load_config
from .run import RunResult, dpo, online_dpo, pretrain, sft, train_reward

__all__ = ["RunResult", "TrainConfig", "dpo", "load_config", "online_dpo", "pretrain", "sft", "train_reward"]
