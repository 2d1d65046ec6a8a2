"""GRPO pieces without Ray: advantages, the clipped loss and its weights against hand values, the verifiers,
the `rl:` config errors, and prompts built from supervised data."""

import math

import pytest
import torch

from fineray.rl._grpo import group_advantages, policy_loss, token_weights
from fineray.rl.config import parse_rl_config
from fineray.rl.rewards import VERIFIERS
from fineray.train.config import ConfigError, load_config


def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 4)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert adv[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4),
                                              0.5 / (std + 1e-4)])
    assert adv[4:].tolist() == [0.0] * 4  # a group that agrees teaches nothing
    assert group_advantages(r, 4, scale=False)[:4].tolist() == [0.5, -0.5, -0.5, 0.5]


def test_clipped_loss_kl_and_clip_fraction_match_hand_values():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.5], [0.4, 0.9]]))  # ratios [[2, 1], [0.5, 1]]
    ref = torch.log(torch.tensor([[0.5, 0.25], [0.2, 0.9]]))
    adv = torch.tensor([1.0, -1.0])
    weights = torch.tensor([[0.25, 0.25], [0.25, 0.0]])  # the last token does not train
    loss, st = policy_loss(logp, old, adv, weights, epsilon=0.2, beta=0.1, ref_logp=ref)
    # token terms: -min(2*1, 1.2*1) = -1.2; -min(1, 1) = -1; -min(0.5*-1, 0.8*-1) = 0.8
    kl = [0.0, 0.5 - math.log(0.5) - 1, 0.0]  # exp(d) - d - 1 with d = ref - logp
    expected = 0.25 * (-1.2 + 0.1 * kl[0]) + 0.25 * (-1.0 + 0.1 * kl[1]) + 0.25 * (0.8 + 0.1 * kl[2])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(st["clipped"]) == 2 and float(st["tokens"]) == 3 and float(st["kl"]) == pytest.approx(sum(kl))
    # ratio 1 (first iteration): the gradient is the advantage-weighted log-prob gradient
    lp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = policy_loss(lp, lp.detach(), torch.tensor([2.0]), torch.full((1, 3), 1 / 3))
    loss.backward()
    assert lp.grad[0].tolist() == pytest.approx([-2 / 3] * 3)


def test_token_weights_give_token_and_sequence_means():
    assert token_weights([2, 6], "token") == [0.125, 0.125]
    assert token_weights([2, 6], "sequence") == [0.25, 1 / 12]


def test_verifiers_score_completions():
    ref = '{"product": "ZenKettle", "order_id": "123", "issue": "late", "urgency": "low"}'
    half = '{"product": "ZenKettle", "order_id": "123", "issue": "damaged", "urgency": "high"}'
    assert VERIFIERS["json_valid"]("Sure: " + ref) == 1.0 and VERIFIERS["json_valid"]("Sure: " + ref, strict=True) == 0.0
    assert VERIFIERS["field_match"](half, reference=ref) == 0.5 and VERIFIERS["field_match"]("nope", reference=ref) == 0.0
    assert VERIFIERS["exact_match"](f" {ref}\n", reference=ref) == 1.0
    schema = {"type": "object", "required": ["urgency"], "properties": {"urgency": {"enum": ["low", "high"]}}}
    assert VERIFIERS["json_schema"](ref, schema=schema) == 1.0
    assert VERIFIERS["json_schema"]('{"urgency": "soon"}', schema=schema) == 0.0
    assert VERIFIERS["regex"]("order 123", pattern=r"\d{3}") == 1.0
    assert VERIFIERS["regex"]("order 123", pattern=r"\d{3}", full=True) == 0.0
    assert [VERIFIERS["length_penalty"]("x" * n, limit=8, window=4) for n in (4, 6, 8, 20)] == [0.0, -0.5, -1.0, -1.0]


def test_rl_config_errors_name_the_key():
    base = ["model.base=tiny:llama", "scaling.num_workers=2"]
    with pytest.raises(ConfigError, match="no `rl:` section"):
        parse_rl_config(load_config(None, base))
    with pytest.raises(ConfigError, match=r"rl\.num_generations"):
        parse_rl_config(load_config(None, base + ["rl={num_generations: 1, rewards: [{name: json_valid}]}"]))
    with pytest.raises(ConfigError, match="unknown built-in reward 'jsn'"):
        parse_rl_config(load_config(None, base + ["rl={rewards: [{name: jsn}]}"]))
    with pytest.raises(ConfigError, match="exactly one of name"):
        parse_rl_config(load_config(None, base + ["rl={rewards: [{name: json_valid, function: 'a:b'}]}"]))
    with pytest.raises(ConfigError, match="multiple of scaling.num_workers"):
        parse_rl_config(load_config(None, base + ["rl={prompts_per_step: 3, rewards: [{name: json_valid}]}"]))
    with pytest.raises(ConfigError, match="distinct"):
        parse_rl_config(load_config(None, base + ["rl={rewards: [{name: json_valid}, {name: json_valid}]}"]))
    rl = parse_rl_config(load_config("configs/grpo.yaml"))
    assert [r.key for r in rl.rewards] == ["json_valid", "field_match", "exact_match"]


def test_prompts_come_from_supervised_and_prompt_only_records(tmp_path, tiny_tok):
    from fineray.rl._prompts import build_prompts

    from ..conftest import write_jsonl

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {i}+{i}?", "solution": str(2 * i)} for i in range(6)])
    cfg = load_config(None, ["model.base=tiny:llama", f"data.train={tmp_path}/p.jsonl", "data.validation=null"])
    train, _ = build_prompts(cfg, tiny_tok, 16)
    assert len(train) == 6 and all(p.reference == p.columns["solution"] for p in train)
    assert train[0].text.endswith("<|im_start|>assistant\n") and train[0].messages[-1]["role"] == "user"
    cfg = load_config(None, ["model.base=tiny:llama", "data.train=fineray:support-tickets/val", "data.validation=null"])
    train, _ = build_prompts(cfg, tiny_tok, 16)
    assert train[0].reference.startswith('{"product"') and train[0].messages[0]["role"] == "system"


def test_packed_policy_batches_give_the_same_loss_and_gradients():
    from fineray.rl._loop import policy_batches
    from fineray.train.fastpath import FastPath, apply_fast_path
    from fineray.train.logprobs import token_logps
    from fineray.train.model import load_for_training
    from fineray.train.templates import Tokenized

    tok, model = load_for_training(load_config(None, ["model.base=tiny:llama", "lora.r=4", "lora.dropout=0"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    torch.manual_seed(0)
    seqs = [Tokenized(list(range(5, 5 + n)) + c, [-100] * n + c)
            for n, c in ((6, [40, 41, 2]), (4, [50, 2]), (9, [60, 61, 62, 63, 2]))]
    adv, w = [1.0, -0.5, 0.25], token_weights([3, 2, 5], "sequence")

    def run(fast):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for b in policy_batches(seqs, adv, w, 2, tok.pad_token_id, fast):
            logp = token_logps(model, b, fast)
            loss, _ = policy_loss(logp, logp.detach(), b["advantages"], b["weights"])
            loss.backward()
            total += float(loss)
        return total, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_g = run(FastPath())
    fast = FastPath(packing=True, attention="sdpa", chunked_loss=True, chunk_tokens=8)
    apply_fast_path(model, fast)
    loss, grads = run(fast)
    # ratio 1: the loss is -sum_i A_i x (a mean per completion over 3 completions) = -(1 - 0.5 + 0.25) / 3
    assert ref_loss == pytest.approx(-0.25, rel=1e-5) and loss == pytest.approx(ref_loss, rel=1e-5)
    for k in ref_g:
        torch.testing.assert_close(grads[k], ref_g[k], rtol=1e-4, atol=1e-7)
