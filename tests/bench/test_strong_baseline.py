"""The strong baseline's padding-free batches keep documents apart (bench/strong_baseline.py, issue 17).

transformers derives a packed-sequence mask from per-document position ids only when there is no attention
mask and no cache; these tests pin that for the two attention implementations the GPU bench can use. The
batches come from transformers' flattening collator (TRL is no dependency of fineray; importing it costs
seconds); where TRL is installed, its padding-free collator is checked to build the very same batch. On the
GPU the bench repeats the separation check on the model it trains (bf16, Liger) and refuses a model that fails.
"""

from __future__ import annotations

import pytest
import torch
from strong_baseline import check_document_separation, make_collator


def _tiny_lora(attn: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, pad_token_id=0)
    cfg._attn_implementation = attn
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                             task_type="CAUSAL_LM"))
    with torch.no_grad():  # B = 0 at init: give the adapters an effect, so their path is checked too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_packed_forward_matches_separate_documents(attn: str) -> None:
    # Prepare
    model = _tiny_lora(attn)
    collate = make_collator("hf")

    # Execute
    rep = check_document_separation(model, collate, "cpu", vocab=512)

    # Assert: fp32, so the packed logits equal the separate ones to rounding; the control (all-ones mask =
    # plain causal attention over the row) differs by orders of magnitude more
    assert rep["separates"] is True
    assert rep["attn"] == attn
    assert rep["packed_vs_separate"] < 1e-5
    assert rep["cross_vs_separate"] > 1e-2


def test_packed_loss_and_lora_grads_equal_per_document_ones() -> None:
    # Prepare: three documents through the strong side's collator (first label of each document is -100)
    model = _tiny_lora("sdpa")
    collate = make_collator("hf")
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(4, 512, (n,), generator=g).tolist() for n in (9, 30, 17)]
    batch = collate([{"input_ids": d} for d in docs])
    lora = [p for n, p in model.named_parameters() if p.requires_grad]

    # Execute: packed loss (mean over its targets) vs the same mean computed document by document
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                use_cache=False)
    packed_grads = torch.autograd.grad(out.loss, lora)
    targets = sum(len(d) - 1 for d in docs)
    per_doc = sum(model(input_ids=torch.tensor([d]), labels=torch.tensor([d]), use_cache=False).loss * (len(d) - 1)
                  for d in docs) / targets
    doc_grads = torch.autograd.grad(per_doc, lora)

    # Assert
    assert int((batch["labels"] != -100).sum()) == targets
    assert torch.allclose(out.loss, per_doc, rtol=1e-5, atol=1e-6)
    for a, b in zip(packed_grads, doc_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_trl_padding_free_batch_equals_the_flattening_one() -> None:
    # Prepare
    pytest.importorskip("trl")
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]

    # Execute
    trl_batch = make_collator("trl")([{"input_ids": d} for d in docs])
    hf_batch = make_collator("hf")([{"input_ids": d} for d in docs])

    # Assert: same row, positions restarting per document, first label of each document ignored, no mask
    for key in ("input_ids", "position_ids", "labels"):
        assert torch.equal(trl_batch[key], hf_batch[key]), key
    assert trl_batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert trl_batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 11, 12, 13]]
    assert "attention_mask" not in trl_batch and "attention_mask" not in hf_batch
