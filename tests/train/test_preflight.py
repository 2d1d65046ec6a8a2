"""Pre-flight: known-bad combinations, and the memory estimate against known numbers."""

import pytest

from fineray.train.config import load_config
from fineray.train.preflight import KNOWN_SHAPES, estimate_memory, format_plan, model_shape, plan_run

GiB = 2**30
# HF Trainer + PEFT baseline settings of issue 8 (plain loss, no packing/compile, LoRA r=16, dropout 0).
BASELINE = ["scaling.use_gpu=true", "lora.r=16", "lora.dropout=0", "data.max_seq_len=2048",
            "train.fast.compile=false", "train.fast.chunked_loss=false", "data.packing=false"]


def _levels(cfg):
    return {(f.level, f.key) for f in plan_run(cfg).findings}


def test_parameter_counts_match_the_published_models():
    assert KNOWN_SHAPES["meta-llama/Llama-3.2-1B"].params == 1_235_814_400
    assert KNOWN_SHAPES["meta-llama/Llama-3.1-8B"].params == 8_030_261_248
    assert KNOWN_SHAPES["meta-llama/Llama-3.1-8B"].lora_params(16, "all-linear") == 41_943_040
    assert KNOWN_SHAPES["meta-llama/Llama-3.1-8B"].lora_params(8, ["q_proj", "v_proj"]) == 3_407_872
    tiny = model_shape("tiny:llama")
    assert (tiny.layers, tiny.hidden, tiny.vocab, tiny.kv_heads) == (2, 64, 512, 2)


@pytest.mark.parametrize("base,batch,measured_gib", [
    ("meta-llama/Llama-3.2-1B", 8, 54.6),   # H200, HF Trainer, 2048 x 8 (issue 8)
    ("meta-llama/Llama-3.1-8B", 4, 80.4),   # H200, HF Trainer, 2048 x 4
])
def test_estimate_matches_measured_baseline_peaks(base, batch, measured_gib):
    cfg = load_config(None, BASELINE + [f"model.base={base}", f"train.batch_size={batch}"])
    est = estimate_memory(cfg, model_shape(base))
    assert est.tokens == 2048 * batch
    assert est.total_gib == pytest.approx(measured_gib, rel=0.08)


def test_estimate_components_follow_the_strategy():
    shape = KNOWN_SHAPES["meta-llama/Llama-3.1-8B"]
    full = ["model.base=meta-llama/Llama-3.1-8B", "method=full", "scaling.use_gpu=true", "scaling.num_workers=2",
            "train.batch_size=1", "data.max_seq_len=1024"]
    ddp = estimate_memory(load_config(None, full), shape)
    fsdp = estimate_memory(load_config(None, full + ["train.strategy=fsdp"]), shape)
    z3 = estimate_memory(load_config(None, full + ["train.strategy=deepspeed"]), shape)
    z3_off = estimate_memory(load_config(None, full + ["train.strategy=deepspeed",
                                                       "train.deepspeed.offload_optimizer=true"]), shape)
    assert ddp.parts["weights"] == shape.params * 2
    assert fsdp.parts["weights+grads+AdamW (sharded fp32)"] == shape.params * 16 / 2
    assert z3.parts["fp32 master+AdamW"] == shape.params * 12 / 2
    assert "fp32 master+AdamW" not in z3_off.parts and z3_off.host_bytes == shape.params * 6
    assert fsdp.total < ddp.total and z3_off.total < z3.total
    q = estimate_memory(load_config(None, ["model.base=meta-llama/Llama-3.1-8B", "method=qlora",
                                           "scaling.use_gpu=true"]), shape)
    lora = estimate_memory(load_config(None, ["model.base=meta-llama/Llama-3.1-8B", "scaling.use_gpu=true"]), shape)
    assert q.parts["weights (4-bit base)"] < 0.4 * lora.parts["weights"]  # 4-bit linears, bf16 embeddings/head
    assert q.parts["activations"] == lora.parts["activations"]  # bf16 blocks either way
    split = estimate_memory(load_config(None, ["model.base=meta-llama/Llama-3.1-8B", "scaling.use_gpu=true",
                                               "train.micro_batch_tokens=1024", "data.max_seq_len=2048"]),
                           shape, tokens=8192)
    assert split.tokens == 2048  # chunks of whole documents: one max_seq_len (2048) document at worst
    assert split.parts["activations"] == lora.parts["activations"] * 2048 / lora.tokens
    chunked = estimate_memory(load_config(None, ["model.base=meta-llama/Llama-3.1-8B", "scaling.use_gpu=true",
                                                 "train.fast.chunked_loss=true", "train.batch_size=16"]), shape)
    plain = estimate_memory(load_config(None, ["model.base=meta-llama/Llama-3.1-8B", "scaling.use_gpu=true",
                                               "train.fast.chunked_loss=false", "train.batch_size=16"]), shape)
    assert chunked.parts["logits (chunked)"] < plain.parts["logits"] / 5  # 2048-token chunks vs 8192 tokens


def test_known_bad_combinations_are_errors():
    # (QLoRA with DeepSpeed is refused when the config loads: tests/train/test_config.py)
    assert ("error", "method") in _levels(load_config(None, ["model.base=tiny:llama", "method=qlora"]))
    assert ("warning", "method") in _levels(load_config(None, ["model.base=tiny:llama", "method=dora"]))
    assert ("error", "train.fast.packing_attention") in _levels(load_config(
        None, ["model.base=tiny:llama", "data.packing=true", "train.fast.packing_attention=varlen"]))
    assert ("error", "data.packing") in _levels(load_config(
        None, ["model.base=tiny:llama", "data.packing=true", "model.trust_remote_code=true"]))
    assert ("error", "train.precision") in _levels(load_config(
        None, ["model.base=tiny:llama", "method=qlora", "scaling.use_gpu=true", "train.precision=fp16"]))
    assert ("error", "train.precision") in _levels(load_config(
        None, ["model.base=tiny:llama", "scaling.use_gpu=true", "train.precision=fp16", "train.strategy=fsdp"]))
    assert ("error", "train.optimizer") in _levels(load_config(
        None, ["model.base=tiny:llama", "train.optimizer=paged_adamw_8bit"]))
    ok = plan_run(load_config(None, ["model.base=tiny:llama"]))
    assert ok.ok and not [f for f in ok.findings if f.level == "error"]


def test_plan_says_whether_it_fits_and_suggests_a_fix():
    cfg = load_config(None, BASELINE + ["model.base=meta-llama/Llama-3.1-8B", "train.batch_size=8"])
    plan = plan_run(cfg, gpu_memory_gib=139)
    assert plan.fits is False and not plan.ok
    assert any("chunked_loss" in s for s in plan.suggestions)
    text = format_plan(plan)
    assert "DOES NOT FIT" in text and "logits" in text and "fix:" in text and "[" not in text
    fast = plan_run(load_config(None, ["model.base=meta-llama/Llama-3.1-8B", "scaling.use_gpu=true",
                                       "train.batch_size=8", "data.max_seq_len=2048", "lora.dropout=0"]),
                    gpu_memory_gib=139)
    assert fast.fits is True and "verdict: fits" in format_plan(fast)


def test_unknown_model_has_no_estimate_but_still_checks():
    plan = plan_run(load_config(None, ["model.base=/nonexistent/model"]))
    assert plan.estimate is None and any(f.key == "model.base" for f in plan.findings)
    assert "checks:" in format_plan(plan)


def test_a_missing_or_broken_deepspeed_file_is_an_error(tmp_path):
    # Prepare
    broken = tmp_path / "ds.json"
    broken.write_text('{"zero_optimization": \n')
    base = ["model.base=tiny:llama", "train.strategy=deepspeed"]
    # Execute
    missing = plan_run(load_config(None, [*base, f"train.deepspeed.config_file={tmp_path}/nope.json"]))
    bad = plan_run(load_config(None, [*base, f"train.deepspeed.config_file={broken}"]))
    # Assert
    assert not missing.ok and any("cannot read" in f.message and "nope.json" in f.message for f in missing.findings)
    assert not bad.ok and any(f"{broken}:2 is not a JSON file" in f.message for f in bad.findings)
