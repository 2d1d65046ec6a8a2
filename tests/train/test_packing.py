"""Sequence packing: layout, document masks, and packed loss/gradients equal to the padded batch (CPU)."""

from pathlib import Path

import pytest
import torch

from fineray.train.config import load_config
from fineray.train.fastpath import FastPath, apply_fast_path, forward_loss, make_batch
from fineray.train.packing import document_mask, pack_documents
from fineray.train.templates import IGNORE_INDEX, Tokenized


def _docs(lengths, seed=1, vocab=500):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Tokenized(ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return out


def test_pack_layout_resets_positions_and_drops_first_labels():
    items = _docs([3, 5, 2])
    b = pack_documents(items, pad_id=0, pad_to_multiple=8)
    assert b["input_ids"].shape == (1, 16)
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1] + [0, 1, 2, 3, 4, 5]
    assert b["cu_seqlens"].tolist() == [0, 3, 8, 10, 16] and b["cu_seqlens"].dtype == torch.int32
    assert b["max_seqlen"] == 6 and b["attention_mask"].sum() == 10
    labels = b["labels"][0].tolist()
    assert labels[0] == labels[3] == labels[8] == IGNORE_INDEX  # no prediction across a document boundary
    assert labels[5:8] == items[1].labels[2:] and all(x == IGNORE_INDEX for x in labels[10:])


def test_document_mask_is_causal_within_documents_only():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    m = document_mask(cu, 5)[0, 0]
    doc = [0, 0, 1, 1, 1]
    expect = torch.tensor([[k <= q and doc[k] == doc[q] for k in range(5)] for q in range(5)])
    assert torch.equal(m, expect)


@pytest.fixture(scope="module")
def tiny_lora():
    from fineray.train.model import load_for_training

    cfg = load_config(None, ["model.base=tiny:llama", "lora.r=4", "lora.dropout=0"])
    _tok, model = load_for_training(cfg)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # non-zero B: gradients reach every LoRA matrix
    return model.double()


@pytest.mark.parametrize("chunked", [False, True])
def test_packed_loss_and_gradients_equal_padded(tiny_lora, chunked):
    model, items = tiny_lora, _docs([5, 17, 9, 30, 2])

    def run(fast):
        model.zero_grad(set_to_none=True)
        loss, n = forward_loss(model, make_batch(items, 0, fast), fast)
        loss.backward()
        return float(loss), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_n, ref_g = run(FastPath())
    fast = FastPath(packing=True, attention="sdpa", chunked_loss=chunked, chunk_tokens=16)
    apply_fast_path(model, fast)
    loss, n, grads = run(fast)
    assert n == ref_n == sum(t.num_target_tokens for t in items)
    assert loss == pytest.approx(ref_loss, rel=1e-6)  # HF upcasts logits to fp32: 1e-6, not 1e-12
    assert set(grads) == set(ref_g) and len(grads) == 28
    for k in ref_g:
        torch.testing.assert_close(grads[k], ref_g[k], rtol=1e-5, atol=1e-8)


def test_loop_with_packing_matches_plain_and_resumes_exactly(tmp_path: Path):
    from fineray.train.loop import train_loop
    from fineray.train.session import LocalSession

    base = ["model.base=tiny:llama", "train.batch_size=4", "train.lr=3e-3", "data.validation=null", "lora.r=4",
            "lora.dropout=0", "train.max_steps=4", "train.eval_every=2", "data.max_examples=64"]
    plain = train_loop(load_config(None, base), LocalSession(tmp_path / "p"))
    cfg = load_config(None, base + ["data.packing=true", "train.fast.chunked_loss=true"])
    full = LocalSession(tmp_path / "a")
    packed = train_loop(cfg, full)
    resumed = train_loop(cfg, LocalSession(tmp_path / "b", resume_from=str(full.checkpoints[0])))
    a = [r["train_loss"] for r in plain.history]
    b = [r["train_loss"] for r in packed.history]
    assert b == pytest.approx(a, rel=1e-4)  # same documents per step, packed: same losses
    assert [r["train_loss"] for r in resumed.history[2:]] == pytest.approx(b[2:], rel=1e-6)
