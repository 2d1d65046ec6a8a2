"""Preference objectives: loss maths against hand computations, pair data (layouts, bad records), the
adapter-disabled reference, packed vs unpacked pair log-probs, and a reward model that learns."""

import json
import math
from pathlib import Path

import pytest
import torch

from fineray.train.config import load_config
from fineray.train.data import DataError, load_examples
from fineray.train.fastpath import FastPath, apply_fast_path
from fineray.train.logprobs import adapter_disabled, document_sums, token_logps
from fineray.train.pairs import pair_batch, preference_example, tokenize_pairs
from fineray.train.preference import preference_loss

from ..conftest import write_jsonl


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Two pairs: summed log-probs of the policy and the reference, and response lengths.
PC, PR, RC, RR = [-10.0, -20.0], [-14.0, -18.0], [-11.0, -19.0], [-12.0, -19.5]
NC, NR = [5.0, 4.0], [4.0, 6.0]


def _t(x: list[float]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def test_dpo_ipo_orpo_simpo_and_reward_losses_match_hand_computations():
    kw = {"ref_chosen": _t(RC), "ref_rejected": _t(RR), "chosen_tokens": _t(NC), "rejected_tokens": _t(NR)}
    dpo, rc, rr = preference_loss("dpo", _t(PC), _t(PR), beta=0.1, label_smoothing=0.1, **kw)
    for i in range(2):
        h = 0.1 * ((PC[i] - RC[i]) - (PR[i] - RR[i]))
        assert float(dpo[i]) == pytest.approx(-0.9 * math.log(_sig(h)) - 0.1 * math.log(_sig(-h)))
        assert float(rc[i]) == pytest.approx(0.1 * (PC[i] - RC[i])) and float(rr[i]) == pytest.approx(0.1 * (PR[i] - RR[i]))
    ipo, _, _ = preference_loss("ipo", _t(PC), _t(PR), beta=0.5, **kw)
    for i in range(2):
        h = (PC[i] - RC[i]) / NC[i] - (PR[i] - RR[i]) / NR[i]
        assert float(ipo[i]) == pytest.approx((h - 1 / (2 * 0.5)) ** 2)
    simpo, _, _ = preference_loss("simpo", _t(PC), _t(PR), beta=2.0, simpo_gamma=0.5, chosen_tokens=_t(NC),
                                  rejected_tokens=_t(NR))
    for i in range(2):
        z = 2.0 * (PC[i] / NC[i] - PR[i] / NR[i]) - 0.5
        assert float(simpo[i]) == pytest.approx(-math.log(_sig(z)))
    orpo, _, _ = preference_loss("orpo", _t(PC), _t(PR), beta=0.1, chosen_tokens=_t(NC), rejected_tokens=_t(NR))
    for i in range(2):
        ac, ar = PC[i] / NC[i], PR[i] / NR[i]
        odds = (ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))
        assert float(orpo[i]) == pytest.approx(-ac - 0.1 * math.log(_sig(odds)))
    bt, _, _ = preference_loss("reward", _t([2.0, -1.0]), _t([1.0, 0.5]), reward_margin=0.5)
    assert bt.tolist() == pytest.approx([-math.log(_sig(0.5)), -math.log(_sig(-2.0))])
    with pytest.raises(ValueError, match="reference"):
        preference_loss("dpo", _t(PC), _t(PR))


def test_preference_layouts_normalise_to_the_same_pair():
    prompt = [{"role": "user", "content": "Hi?"}]
    conv = preference_example({"prompt": prompt, "chosen": [{"role": "assistant", "content": "Yes"}],
                               "rejected": [{"role": "assistant", "content": "No"}]})
    text = preference_example({"prompt": "Hi?", "chosen": "Yes", "rejected": "No"})
    ultra = preference_example({"prompt": "Hi?", "chosen": prompt + [{"role": "assistant", "content": "Yes"}],
                                "rejected": prompt + [{"role": "assistant", "content": "No"}], "messages": []})
    hh = preference_example({"chosen": "\n\nHuman: Hi?\n\nAssistant: Yes", "rejected": "\n\nHuman: Hi?\n\nAssistant: No"})
    for ex in (conv, text, ultra, hh):
        assert ex.messages == prompt + [{"role": "assistant", "content": "Yes"}] and ex.rejected == "No"
    sys = preference_example({"prompt": "Hi?", "chosen": "Yes", "rejected": "No"}, system_prompt="Be brief.")
    assert sys.messages[0] == {"role": "system", "content": "Be brief."}


def test_bad_preference_records_are_named_by_file_and_line(tmp_path: Path):
    good = {"prompt": "Hi?", "chosen": "Yes", "rejected": "No"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, good, {"prompt": "Hi?", "chosen": "Yes", "rejected": 3}])
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: field 'rejected' must be a string"):
        load_examples(str(path), "preference")
    path.write_text(json.dumps(good) + "\n" + json.dumps({"chosen": "\n\nHuman: A\n\nAssistant: B",
                                                          "rejected": "\n\nHuman: C\n\nAssistant: D"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: the turns before the final rejected response differ"):
        load_examples(str(path))
    stats: dict[str, int] = {}
    assert len(load_examples(str(path), on_error="skip", stats=stats)) == 1 and stats["skipped_malformed"] == 1


def test_long_pairs_are_dropped_and_long_prompts_truncated_and_counted(tiny_tok):
    short = preference_example({"prompt": "Hi?", "chosen": "Yes", "rejected": "No"})
    long_prompt = preference_example({"prompt": "word " * 200, "chosen": "Yes", "rejected": "No"})
    stats: dict[str, int] = {}
    pairs = tokenize_pairs(tiny_tok, [short, long_prompt], max_seq_len=64, stats=stats)
    assert len(pairs) == 1 and stats["dropped_too_long"] == 1
    pairs = tokenize_pairs(tiny_tok, [short, long_prompt], max_seq_len=64, max_prompt_len=20, stats=stats)
    assert len(pairs) == 2 and stats["truncated_prompt"] == 1 and stats["dropped_too_long"] == 0
    assert all(len(p.chosen) <= 64 for p in pairs)
    # labels on the final response only
    c = pairs[0].chosen
    assert tiny_tok.decode([t for t in c.labels if t != -100]).startswith("Yes")


def _pairs(tok, n=4):
    exs = [preference_example({"prompt": f"Add {i} and {i}.", "chosen": str(2 * i), "rejected": f"{i} or so"})
           for i in range(n)]
    return tokenize_pairs(tok, exs, max_seq_len=128)


def _lora_model(seed=0):
    cfg = load_config(None, ["model.base=tiny:llama", "lora.r=4", "lora.dropout=0"])
    from fineray.train.model import load_for_training

    tok, model = load_for_training(cfg)
    torch.manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # a trained-looking adapter, so disabling it changes the outputs
            torch.nn.init.normal_(p, std=0.2)
    return tok, model


def test_adapter_disabled_reference_equals_a_separate_frozen_copy(tiny_dir):
    from transformers import AutoModelForCausalLM

    tok, model = _lora_model()
    pairs = _pairs(tok)
    batch = pair_batch(pairs, tok.pad_token_id, FastPath())
    with torch.no_grad():
        with adapter_disabled(model) as base:
            ref, _ = document_sums(token_logps(base, batch, FastPath()), batch)
        frozen = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
        copy, _ = document_sums(token_logps(frozen, batch, FastPath()), batch)
        policy, _ = document_sums(token_logps(model, batch, FastPath()), batch)
    assert ref.shape == (8,)
    torch.testing.assert_close(ref, copy, rtol=1e-5, atol=1e-5)
    assert (policy - copy).abs().max() > 1e-3  # the adapter is on again after the context


@pytest.mark.parametrize("chunked", [False, True])
def test_packed_pair_logprobs_and_gradients_equal_unpacked(chunked: bool):
    tok, model = _lora_model()
    pairs = _pairs(tok, 3)

    def run(fast: FastPath):
        model.zero_grad(set_to_none=True)
        batch = pair_batch(pairs, tok.pad_token_id, fast)
        sums, counts = document_sums(token_logps(model, batch, fast), batch)
        (sums[:3] - 0.5 * sums[3:]).sum().backward()
        return sums.detach(), counts, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref_sums, ref_counts, ref_g = run(FastPath())
    fast = FastPath(packing=True, attention="sdpa", chunked_loss=chunked, chunk_tokens=16)
    apply_fast_path(model, fast)
    sums, counts, grads = run(fast)
    assert counts.tolist() == ref_counts.tolist() == [p.chosen.num_target_tokens for p in pairs] + [
        p.rejected.num_target_tokens for p in pairs]
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-4)
    assert set(grads) == set(ref_g) and grads
    for k in ref_g:
        torch.testing.assert_close(grads[k], ref_g[k], rtol=1e-4, atol=1e-6)


def test_chunked_token_logps_match_log_softmax_with_a_trainable_head():
    from fineray.train.fused_loss import chunked_token_logps

    torch.manual_seed(0)
    h = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (2, 7))
    t[0, 0] = t[1, 6] = -100
    up = torch.randn(2, 7, dtype=torch.float64)
    lp = chunked_token_logps(h, w, t, chunk_tokens=3)
    (lp * up).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.log_softmax(h @ w.t(), -1).gather(-1, t.clamp(min=0)[..., None]).squeeze(-1) * (t != -100)
    (ref * up).sum().backward()
    torch.testing.assert_close(lp, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_reward_model_accuracy_rises_on_a_separable_toy_set(tmp_path: Path):
    from fineray.train.loop import train_loop
    from fineray.train.session import LocalSession

    rows = [{"prompt": f"Ticket {i}: is the order late?", "chosen": "yes it is late", "rejected": "banana"}
            for i in range(48)]
    write_jsonl(tmp_path / "train.jsonl", rows[:40])
    write_jsonl(tmp_path / "val.jsonl", rows[40:])
    cfg = load_config(None, ["model.base=tiny:llama", "objective=reward", f"data.train={tmp_path}/train.jsonl",
                             f"data.validation={tmp_path}/val.jsonl", "train.max_steps=12", "train.eval_every=1",
                             "train.batch_size=4", "train.lr=3e-2", "lora.r=4", "lora.dropout=0",
                             "train.warmup_ratio=0"])
    state = train_loop(cfg, LocalSession(tmp_path / "ck"))
    acc = [r["val_reward_accuracy"] for r in state.history]
    margin = [r["val_reward_margin"] for r in state.history]
    assert acc[-1] == 1.0 and margin[-1] > margin[0] + 0.5
    saved = (tmp_path / "ck" / "checkpoint_000012" / "adapter")
    from safetensors.torch import load_file

    assert any("score" in k for k in load_file(saved / "adapter_model.safetensors"))  # the head is saved


def test_full_fine_tune_dpo_precomputes_the_reference_and_resumes_in_a_local_session(tmp_path: Path):
    """Full fine-tuning has no adapter to disable: the reference log-probs are computed once before step 1; a
    run resumed from its step-2 checkpoint continues with the same losses (the reference is not the resumed
    weights)."""
    from fineray.train.loop import train_loop
    from fineray.train.session import LocalSession

    # Prepare
    cfg = load_config(None, ["model.base=tiny:llama", "method=full", "objective=dpo",
                             "data.train=fineray:support-pairs", "data.validation=fineray:support-pairs/val",
                             "data.max_examples=16", "train.max_steps=4", "train.eval_every=2", "train.batch_size=4",
                             "train.eval_batches=1", "train.lr=1e-3"])
    # Execute
    state = train_loop(cfg, LocalSession(tmp_path / "ck"))
    resumed = train_loop(cfg, LocalSession(tmp_path / "again", resume_from=str(tmp_path / "ck" / "checkpoint_000002")))
    # Assert
    first, last = state.history[0], state.history[-1]
    # The reference is the starting model: the first step's implicit rewards are exactly 0.
    assert first["train_reward_margin"] == 0.0 and first["train_kl"] == 0.0
    assert last["val_reward_margin"] != 0.0 and "val_kl" in last
    assert (tmp_path / "ck" / "checkpoint_000004" / "model").is_dir()
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4]
    for key in ("train_loss", "train_reward_margin", "train_kl"):
        assert [r[key] for r in resumed.history[2:]] == pytest.approx([r[key] for r in state.history[2:]], rel=1e-5)


def test_rpo_adds_the_chosen_nll_to_dpo(tiny_tok):
    from fineray.train.preference import PreferenceObjective

    cfg = load_config(None, ["model.base=tiny:llama", "objective=dpo", "dpo.rpo_alpha=0.5", "lora.r=4"])
    tok, model = _lora_model()
    pairs = _pairs(tok, 2)
    obj = PreferenceObjective(cfg)
    batch = pair_batch(pairs, tok.pad_token_id, FastPath())
    with torch.no_grad():
        loss, _ = obj.loss(model, batch, FastPath())
        sums, counts = document_sums(token_logps(model, batch, FastPath()), batch)
        with adapter_disabled(model) as base:
            ref, _ = document_sums(token_logps(base, batch, FastPath()), batch)
    dpo, _, _ = preference_loss("dpo", sums[:2], sums[2:], ref_chosen=ref[:2], ref_rejected=ref[2:], beta=0.1)
    assert float(loss) == pytest.approx(float((dpo - 0.5 * sums[:2] / counts[:2]).mean()), rel=1e-5)
    assert pairs[0].ref is not None  # the frozen reference is kept on the pair for the next epoch
