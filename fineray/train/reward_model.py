"""Reward models: the base model's backbone with a scalar score head, trained on preference pairs.

`objective: reward` loads the base as a one-label sequence classifier (`AutoModelForSequenceClassification`)
and trains LoRA plus the score head (PEFT `SEQ_CLS`, the head saved with the adapter) with the Bradley-Terry
loss. The score of a conversation is the head's output at its last token: batches are left-padded and the
model's pad id is set to a value no token has, so the classifier reads the last column of every row.

Registered with kind `reward`; `RewardScorer` loads one from the registry (or a folder) and scores
conversations, for GRPO rewards and for offline scoring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fineray.train.config import RunConfig
from fineray.train.data import Example
from fineray.train.templates import tokenize_example

__all__ = ["RewardScorer", "load_reward_for_training", "load_reward_model", "read_last_token", "score_batch"]

_NO_PAD = -1  # a pad id no token has: the classifier's "last non-pad token" is then the last column


def read_last_token(model: torch.nn.Module) -> None:
    """Make the classifier score the last column of a (left-padded) batch."""
    inner = model
    while hasattr(inner, "base_model") and inner.base_model is not inner:
        inner = inner.base_model
    for m in (model, inner, getattr(inner, "model", None)):
        cfg = getattr(m, "config", None)
        if cfg is not None:
            cfg.get_text_config().pad_token_id = _NO_PAD


def _parent_lora(cfg: RunConfig, adapter_path: str) -> Any:
    """The LoRA shape of a parent (supervised) adapter, so its weights load into the reward model."""
    parent = json.loads((Path(adapter_path) / "adapter_config.json").read_text())
    lora = cfg.lora.model_copy(update={"r": parent["r"], "alpha": parent["lora_alpha"],
                                       "target_modules": parent["target_modules"]})
    if isinstance(lora.target_modules, list):
        lora.target_modules = sorted(lora.target_modules)
    return lora


def load_reward_for_training(cfg: RunConfig, *, use_gpu: bool = False, adapter_path: str | None = None,
                             device: torch.device | str | None = None) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and trainable reward model for a RunConfig (`objective: reward`).

    With `model.adapter` (a supervised adapter) the reward model starts from it: a fresh `SEQ_CLS` adapter of
    the same shape takes its LoRA weights, so the reward adapter applies to the plain base like any other.
    """
    from fineray.train.model import apply_peft, load_base_model, load_tokenizer, resolve_base

    path = resolve_base(cfg.model.base)
    tok = load_tokenizer(cfg.model, path)
    model = load_base_model(cfg.model, method=cfg.method, use_gpu=use_gpu, path=path, device=device,
                            score_head=True)
    lora = _parent_lora(cfg, adapter_path) if adapter_path and cfg.method != "full" else cfg.lora
    model = apply_peft(model, cfg.method, lora, None, cfg.train.grad_checkpointing, task_type="SEQ_CLS")
    if adapter_path and cfg.method != "full":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(Path(adapter_path) / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, {k: v for k, v in weights.items() if "lora_" in k})
    read_last_token(model)
    return tok, model


def score_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scores (rows,) of a left-padded batch (`pairs.collate_left`)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"])
    return out.logits[:, 0].float()


def load_reward_model(ref: str, registry: str = "adapters", base: str | None = None,
                      device: str = "cpu") -> tuple[Any, torch.nn.Module]:
    """Tokenizer and eval-mode reward model from a registry reference (`name`, `name@vN`) or an adapter folder."""
    from peft import PeftModel

    from fineray.train.config import ModelConfig
    from fineray.train.model import ModelError, load_base_model, load_tokenizer, resolve_base

    folder = Path(ref).expanduser()
    if not folder.is_dir():
        from fineray.train.registry import AdapterRegistry

        reg = AdapterRegistry(registry)
        version = reg.get(ref)
        if version.manifest.get("kind", "adapter") != "reward":
            raise ModelError(f"{version.ref} is not a reward model (kind {version.manifest.get('kind', 'adapter')!r})")
        base = base or version.manifest.get("base_model")
        folder = reg.local_path(version.ref)
    if base is None:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    mcfg = ModelConfig(base=base)
    path = resolve_base(mcfg.base)
    tok = load_tokenizer(mcfg, path)
    model = PeftModel.from_pretrained(load_base_model(mcfg, score_head=True, path=path), str(folder))
    read_last_token(model)
    return tok, model.to(device).eval()


class RewardScorer:
    """A loaded reward model that scores conversations (the last turn being the response)."""

    def __init__(self, ref: str, registry: str = "adapters", base: str | None = None, device: str = "cpu",
                 batch_size: int = 16) -> None:
        self.tok, self.model = load_reward_model(ref, registry, base, device)
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def score(self, conversations: list[list[dict[str, str]]]) -> list[float]:
        """One score per conversation (chat messages ending in the assistant response)."""
        from fineray.train.pairs import collate_left

        items = [tokenize_example(self.tok, Example(messages=c)) for c in conversations]
        out: list[float] = []
        pad = self.tok.pad_token_id or 0
        for i in range(0, len(items), self.batch_size):
            batch = {k: v.to(self.device) for k, v in collate_left(items[i:i + self.batch_size], pad).items()}
            out.extend(score_batch(self.model, batch).tolist())
        return out
