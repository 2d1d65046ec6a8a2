"""The strong baseline of bench/train_throughput.py (issue 17): what a careful HF user runs today.

TRL's `SFTTrainer` (pinned: trl 1.16.0) + PEFT LoRA, padding-free batches and Liger kernels:
  * padding-free: TRL's `DataCollatorForLanguageModeling(padding_free=True)` concatenates the micro-batch's
    documents into one row with per-document `position_ids` (0, 1, ... per document), no attention mask, and
    the first label of every document set to -100 (fineray's packing drops the same labels);
  * document separation: transformers derives the packed-sequence mask from those `position_ids`
    (`masking_utils.find_packed_sequence_indices`) when there is no 2-D attention mask AND no cache. With
    `flex_attention` it becomes a document block mask (masked blocks are skipped); with `sdpa` a dense
    block-diagonal causal mask. The GPU machine has no flash-attn package (and no hub for `kernels`), so
    these two are the document-separating choices there; `flex_attention` is the default on CUDA (sdpa on
    CPU: PyTorch has no FlexAttention backward on CPU).
    Trap: with `use_cache=True` (the config's default outside the trainers) transformers skips the
    detection and the row is one causal sequence, i.e. documents attend across. `check_document_separation`
    runs on the very model that trains and the run is refused if it does not separate documents;
  * Liger (`use_liger_kernel=True`, liger-kernel 0.8.5): RMSNorm, SwiGLU and RoPE Triton kernels. TRL 1.16
    forces Liger's fused linear cross-entropy off and uses its own chunked LM head (Triton kernel; loss,
    entropy and top-1 metrics without (tokens x vocab) logits), which is the fused-CE part of this stack;
  * bf16 weights, fused AdamW, constant LR 2e-4, no gradient checkpointing (TRL's default turns it on;
    off is faster and the naive baseline and fineray run without it).
`impl="hf"` is the fallback without TRL: HF `Trainer` + transformers' `DataCollatorWithFlattening` (the same
batch) + Liger with its fused linear cross-entropy. Liger needs CUDA (Triton): on CPU it is off and labelled.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["STRONG_ATTENTION", "check_document_separation", "make_collator", "make_trainer", "strong_attention",
           "strong_impl"]

STRONG_ATTENTION = ("flex_attention", "sdpa")  # the document-separating implementations that run without flash-attn


def strong_attention(device: str) -> str:
    """flex_attention on CUDA (skips masked blocks); sdpa on CPU, where PyTorch has no FlexAttention backward."""
    return "flex_attention" if device == "cuda" else "sdpa"


def strong_impl(requested: str = "auto") -> str:
    """`trl` when TRL imports (it needs `datasets`), else `hf`; an explicit request is honoured as is."""
    if requested != "auto":
        return requested
    try:
        import trl  # noqa: F401
    except Exception:  # noqa: BLE001 - a missing or broken TRL install both mean: fall back
        return "hf"
    return "trl"


def make_collator(impl: str, pad_id: int = 0) -> Any:
    """The padding-free collator each implementation uses (TRL's own, or transformers' flattening one)."""
    if impl == "trl":
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)


def _tokenizer(pad_id: int = 0) -> Any:
    """A minimal fast tokenizer (TRL wants one for the pad token; the data is already token ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<pad>": pad_id, "<s>": 1, "</s>": 2, "<unk>": 3}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_trainer(model: Any, seq_docs: list[list[int]], batch: int, n_steps: int, device: str, out_dir: str,
                 callbacks: list[Any], impl: str, liger: bool) -> Any:
    """The strong side's trainer over `seq_docs` in this order (`batch` documents per step, no shuffling).

    `model` is a PEFT model (LoRA already applied, as TRL does with `peft_config`), `use_cache` off.
    """
    gpu = device == "cuda"
    common: dict[str, Any] = {
        "output_dir": out_dir, "per_device_train_batch_size": batch, "max_steps": n_steps, "learning_rate": 2e-4,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "optim": "adamw_torch_fused" if gpu else "adamw_torch",
        "bf16": gpu, "logging_steps": 1, "save_strategy": "no", "report_to": [], "dataloader_num_workers": 0,
        "gradient_checkpointing": False, "seed": 0, "disable_tqdm": True, "use_cpu": not gpu,
        "use_liger_kernel": liger}

    def sequential(trainer_cls: type) -> type:
        class Sequential(trainer_cls):  # the same order as the other sides: no shuffling
            def _get_train_sampler(self, *a: Any, **k: Any) -> Any:
                return torch.utils.data.SequentialSampler(self.train_dataset)

        return Sequential

    if impl == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, padding_free=True, max_length=None, packing=False,
                         dataset_kwargs={"skip_prepare_dataset": True}, completion_only_loss=False)
        return sequential(SFTTrainer)(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": seq_docs}),
                                      processing_class=_tokenizer(), callbacks=callbacks)
    from transformers import Trainer, TrainingArguments

    class DS(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(seq_docs)

        def __getitem__(self, k: int) -> dict[str, list[int]]:
            return {"input_ids": seq_docs[k]}

    args = TrainingArguments(**common, remove_unused_columns=False)
    return sequential(Trainer)(model=model, args=args, train_dataset=DS(), data_collator=make_collator("hf"),
                               callbacks=callbacks)


def apply_liger_now(trainer: Any) -> None:
    """Apply the Liger kernels the trainer would apply at `train()` (idempotent), so checks see them."""
    if trainer.args.use_liger_kernel:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(trainer.model, trainer.args.liger_kernel_config)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@torch.no_grad()
def check_document_separation(model: Any, collate: Any, device: str, vocab: int,
                              lengths: tuple[int, ...] = (37, 64, 23), seed: int = 1) -> dict[str, Any]:
    """Does a padding-free forward of `model` keep documents apart?

    Three documents go through the model once packed (as the collator builds the training batch) and once
    each on its own; the packed logits of documents 2 and 3 must match their separate logits. As a control,
    the same packed row with an all-ones attention mask (plain causal attention over the row, i.e.
    documents attend to earlier documents) must differ clearly, else the check would have no power.
    Returns relative L2 errors and `separates` = packed error < 0.25 x control error. Document 1 (nothing
    before it) gives the rounding floor of "packed vs alone" (`noise_doc1`). Measured on CPU with a random
    8-layer bf16 Llama: floor 2e-3, packed 2e-3, control 1.36; fp32 tiny model: 6e-8 vs 0.57.
    """
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]
    batch = collate([{"input_ids": d} for d in docs])
    ids = batch["input_ids"].to(device)
    pos = batch["position_ids"].to(device)
    extra = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
             if k.startswith(("cu_seq_lens", "max_length"))}
    was_training = model.training
    model.eval()  # dropout is 0 anyway; eval keeps the check deterministic
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    try:
        with ctx:
            packed = model(input_ids=ids, position_ids=pos, use_cache=False, **extra).logits[0]
            cross = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids),
                          use_cache=False).logits[0]
            alone = [model(input_ids=torch.tensor([d], device=device), use_cache=False).logits[0] for d in docs]
    finally:
        model.train(was_training)
    start = len(docs[0])  # document 1 has nothing before it: only later documents can see across
    sep = torch.cat(alone[1:])
    packed_err, cross_err = _rel(packed[start:], sep), _rel(cross[start:], sep)
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return {"attn": attn, "packed_vs_separate": packed_err, "cross_vs_separate": cross_err,
            "noise_doc1": _rel(packed[:start], alone[0]), "separates": bool(packed_err < 0.25 * cross_err),
            "lengths": list(lengths)}
