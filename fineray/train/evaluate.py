"""Held-out evaluation: perplexity, generation metrics, and forgetting on general text; base vs tuned.

Generation is batched (left padding, greedy). The tuned model is the base with the adapter attached, and
the base numbers come from the same weights with the adapter disabled, so one model load serves both.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fineray.train.batches import collate
from fineray.train.config import EvalConfig, RunConfig
from fineray.train.data import Example, load_examples
from fineray.train.metrics import compute_metrics, perplexity
from fineray.train.templates import prompt_text, tokenize_all

__all__ = ["evaluate_examples", "evaluate_run", "generate", "load_eval_examples", "nll"]


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int = 96,
             batch_size: int = 16) -> list[str]:
    """Greedy completions of raw prompt strings, in batches."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                outs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return outs


@torch.no_grad()
def nll(model: torch.nn.Module, tokenizer: Any, examples: list[Example], max_seq_len: int,
        batch_size: int = 8) -> tuple[float, int]:
    """Total negative log-likelihood over target tokens, and the token count."""
    model.eval()
    data = tokenize_all(tokenizer, examples, max_seq_len)
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in collate(data[i:i + batch_size], tokenizer.pad_token_id).items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(out.loss) * n
        tokens += n
    return total, tokens


def evaluate_examples(model: torch.nn.Module, tokenizer: Any, examples: list[Example], ecfg: EvalConfig,
                      max_seq_len: int, general: list[Example] | None = None) -> dict[str, Any]:
    """Perplexity and generation metrics of `model` on chat examples (references: last assistant turn)."""
    t0 = time.perf_counter()
    chats = [e for e in examples if e.messages][: ecfg.max_examples]
    res: dict[str, Any] = {"n": len(chats)}
    s, n = nll(model, tokenizer, chats, max_seq_len)
    res["perplexity"] = perplexity(s, n)
    prompts = [prompt_text(tokenizer, e.messages) for e in chats]
    refs = [next(m["content"] for m in reversed(e.messages) if m["role"] == "assistant") for e in chats]
    preds = generate(model, tokenizer, prompts, ecfg.max_new_tokens, ecfg.batch_size)
    res.update(compute_metrics(ecfg.metrics, preds, refs))
    if general:
        s, n = nll(model, tokenizer, general, max_seq_len)
        res["general_perplexity"] = perplexity(s, n)
    res["samples"] = [{"prompt": e.messages[-2]["content"][:200], "reference": r, "prediction": p}
                      for e, r, p in list(zip(chats, refs, preds))[:3]]
    res["eval_s"] = round(time.perf_counter() - t0, 2)
    return res


def load_eval_examples(cfg: RunConfig, data: str | None = None) -> tuple[list[Example], list[Example] | None]:
    """Held-out examples (eval.data, else data.validation when it is a file) and the general text sample."""
    src = data or cfg.eval.data or (cfg.data.validation if isinstance(cfg.data.validation, str) else None)
    if src is None:
        raise ValueError("no held-out set: set eval.data (or data.validation to a file)")
    # Generation is scored against supervised answers: preference pairs or bare prompts train, but the
    # held-out set of a preference or RL run is read with its own (detected) format.
    fmt = "auto" if cfg.data.format in ("preference", "prompt") else cfg.data.format
    examples = load_examples(src, fmt, cfg.data.on_error, cfg.data.system_prompt)
    general = load_examples(cfg.eval.general_text, "text") if cfg.eval.general_text else None
    return examples, general


def evaluate_run(cfg: RunConfig, adapter_dir: str | None, data: str | None = None,
                 threads: int | None = None) -> dict[str, Any]:
    """Base vs tuned metrics side by side for an adapter (or a full model directory)."""
    from fineray.train.model import load_base_model, load_tokenizer, resolve_base

    if threads:
        torch.set_num_threads(threads)
    examples, general = load_eval_examples(cfg, data)
    base_path = resolve_base(cfg.model.base)
    tok = load_tokenizer(cfg.model, base_path)
    model = load_base_model(cfg.model, method="lora", path=base_path)
    out: dict[str, Any] = {"base": evaluate_examples(model, tok, examples, cfg.eval, cfg.data.max_seq_len, general)}
    if adapter_dir is None:
        return out
    from pathlib import Path

    if (Path(adapter_dir) / "adapter_config.json").exists():
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(model, adapter_dir)
    else:
        tuned = load_base_model(cfg.model, method="full", path=adapter_dir)
    out["tuned"] = evaluate_examples(tuned, tok, examples, cfg.eval, cfg.data.max_seq_len, general)
    return out
