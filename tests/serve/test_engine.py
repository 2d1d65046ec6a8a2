"""The batched multi-adapter engine, in-process: tokens match PEFT's own greedy `generate`, mixed-adapter
and continuous batches give the same tokens as one request at a time, sampling is per-row, stops and limits
hold, and an evicted adapter outlives the rows still using it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from fineray.serve.engine import BASE, AdapterNotServable, Engine, EngineError, GenEvent, GenRequest
from fineray.serve.sampling import SamplingParams, TextTracker

GREEDY = SamplingParams(max_tokens=12, temperature=0)
QUESTIONS = ["My order #123 never arrived", "refund please", "The app crashes when I open settings on my phone"]


@pytest.fixture(scope="module", params=["dynamic", "static"])
def engine(request: pytest.FixtureRequest, adapter_dirs: dict[str, Path]) -> Engine:
    # Every test runs on both batch kinds: the dynamic cache (CPU default) and the static-slot fast path
    # (the GPU default), here eagerly with prefill chunks of 48 tokens, so a group's prompts (15-39 tokens each) are split across
    # forward passes and one prompt spans two.
    # FINERAY_TEST_DEVICE=cuda runs them on a GPU (fp32, so tokens still match PEFT on the CPU) with the static
    # batch's decode steps captured as CUDA graphs: how the GPU path is checked on the device machine.
    device = os.environ.get("FINERAY_TEST_DEVICE", "cpu")
    eng = Engine("tiny:llama", device=device, dtype="float32", max_batch_size=8, threads=1, cache=request.param,
                 prefill_tokens=48)
    eng.load_adapter("alpha@v1", adapter_dirs["alpha"])
    eng.load_adapter("beta@v1", adapter_dirs["beta"])
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts(engine: Engine) -> list[list[int]]:
    tok = engine.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_single_requests_match_peft_generate(engine, prompts, peft_reference):
    # Prepare
    cases = [(key, ref, i) for key, ref in ((BASE, None), ("alpha@v1", "alpha"), ("beta@v1", "beta"))
             for i in range(len(prompts))]
    # Execute
    got = {(key, i): engine.generate([prompts[i]], GREEDY, [key])[0].token_ids for key, _, i in cases}
    # Assert
    for key, ref, i in cases:
        assert got[(key, i)] == peft_reference(ref, prompts[i], 12), (key, i)
    assert got[(BASE, 0)] != got[("alpha@v1", 0)] != got[("beta@v1", 0)] != got[(BASE, 0)]


def test_mixed_adapter_batch_equals_one_by_one(engine, prompts):
    # Prepare: every prompt under every adapter, interleaved in one group (one prefill, shared decode steps)
    keys = [BASE, "alpha@v1", "beta@v1"] * 2  # + the two other orders: 6 rows <= max_batch_size 8
    ps = [prompts[i // 3] for i in range(3)] + [prompts[2 - i // 3] for i in range(3)]
    single = [engine.generate([p], GREEDY, [k])[0] for p, k in zip(ps, keys)]
    steps: list[tuple[str, int, int]] = []
    engine.on_step = lambda kind, rows, adapters, secs: steps.append((kind, rows, adapters))
    # Execute
    try:
        batched = engine.generate(ps, GREEDY, keys)
    finally:
        engine.on_step = None
    # Assert
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert [c.text for c in batched] == [c.text for c in single]
    if engine.cache == "dynamic":
        assert ("prefill", 6, 3) in steps  # all six rows, three adapters, one forward pass
    else:  # chunked prefill (a 39-token prompt spans two chunks), decode steps shared by all three adapters
        assert sum(r for k, r, _ in steps if k == "prefill") > 6
        assert ("decode", 6, 3) in steps


def test_requests_joining_a_running_batch_get_the_same_tokens(engine, prompts):
    # Prepare
    keys = ["alpha@v1", BASE, "beta@v1", "alpha@v1", "beta@v1", BASE]
    expected = [engine.generate([prompts[i % 3]], GREEDY, [k])[0].token_ids for i, k in enumerate(keys)]
    done: dict[int, GenEvent] = {}
    all_done = threading.Event()

    def emitter(i: int):
        def emit(ev: GenEvent) -> None:
            if ev.finish_reason:
                done[i] = ev
                if len(done) == len(keys):
                    all_done.set()
        return emit

    # Execute: staggered arrivals join between decode steps (iteration-level batching)
    for i, k in enumerate(keys):
        engine.submit([GenRequest(prompts[i % 3], GREEDY, emitter(i), k)])
        time.sleep(0.02)
    assert all_done.wait(60)
    # Assert
    assert [done[i].token_ids for i in range(len(keys))] == expected


def test_seeded_sampling_does_not_depend_on_the_batch(engine, prompts):
    # Prepare
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    # Execute
    alone = engine.generate([prompts[0]], params, ["alpha@v1"])[0]
    in_batch = engine.generate([prompts[1], prompts[0], prompts[2]], [GREEDY, params, GREEDY],
                               [BASE, "alpha@v1", "beta@v1"])[1]
    other_seed = engine.generate([prompts[0]], SamplingParams(max_tokens=16, temperature=0.9, seed=99),
                                 ["alpha@v1"])[0]
    # Assert
    assert alone.token_ids == in_batch.token_ids
    assert alone.token_ids != other_seed.token_ids


def test_stop_string_and_length_limits(engine, prompts):
    # Prepare
    full = engine.generate([prompts[0]], SamplingParams(max_tokens=20, temperature=0), [BASE])[0]
    stop = full.text[4:7]
    assert len(stop) == 3 and full.text.find(stop) == 4
    # Execute
    stopped = engine.generate([prompts[0]], SamplingParams(max_tokens=20, temperature=0, stop=[stop]), [BASE])[0]
    short = engine.generate([prompts[0]], SamplingParams(max_tokens=3, temperature=0), [BASE])[0]
    # Assert
    assert full.finish_reason == "length" and full.completion_tokens == 20
    assert stopped.text == full.text[:4] and stopped.finish_reason == "stop"
    assert short.finish_reason == "length" and short.completion_tokens == 3 and full.text.startswith(short.text)


def test_evicted_adapter_stays_until_its_rows_finish(engine, prompts, adapter_dirs):
    # Prepare
    engine.load_adapter("gamma@v1", adapter_dirs["gamma"])
    expected = engine.generate([prompts[2]], SamplingParams(max_tokens=30, temperature=0), ["gamma@v1"])[0]
    finished = threading.Event()
    result: list[GenEvent] = []

    def emit(ev: GenEvent) -> None:
        if ev.finish_reason or ev.error:
            result.append(ev)
            finished.set()

    # Execute: evict right after submitting; the running row keeps its weights
    engine.submit([GenRequest(prompts[2], SamplingParams(max_tokens=30, temperature=0), emit, "gamma@v1")])
    engine.unload_adapter("gamma@v1")
    assert finished.wait(60)
    time.sleep(0.2)
    # Assert
    assert result[0].error is None and result[0].token_ids == expected.token_ids
    assert "gamma@v1" not in engine.loaded_adapters()
    with pytest.raises(EngineError, match="not loaded"):
        engine.generate([prompts[0]], GREEDY, ["gamma@v1"])


def test_text_tracker_holds_back_possible_stop_prefixes(tiny_tok):
    # Prepare
    ids = tiny_tok("hello world, refund", add_special_tokens=False)["input_ids"]
    tracker = TextTracker(tiny_tok, ["world,"])
    # Execute
    deltas, stopped = [], False
    for t in ids:
        d, stopped = tracker.add(t)
        deltas.append(d)
        if stopped:
            break
    # Assert: nothing of "world," is ever sent, and the text ends before it
    assert stopped
    assert "".join(deltas) == "hello "


def test_dora_adapters_are_refused_with_a_reason(engine, tmp_path):
    # Prepare: a DoRA adapter (PEFT cannot put DoRA rows into a mixed-adapter batch)
    from peft import LoraConfig, get_peft_model

    from fineray.train.config import ModelConfig
    from fineray.train.model import load_base_model

    model = get_peft_model(load_base_model(ModelConfig(base="tiny:llama")),
                           LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "dora")
    # Execute / Assert
    with pytest.raises(AdapterNotServable, match="DoRA"):
        engine.load_adapter("dora@v1", tmp_path / "dora")
    assert "dora@v1" not in engine.loaded_adapters()


def test_ranks_target_sets_and_scaling_variants_match_peft(engine, prompts, peft_reference, tmp_path):
    # Prepare: rank 8 (the stacks grow from rank 4), two targets only, rsLoRA and a per-module alpha
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from fineray.train.config import ModelConfig
    from fineray.train.model import load_base_model

    model = get_peft_model(load_base_model(ModelConfig(base="tiny:llama")),
                           LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                      alpha_pattern={"v_proj": 12}, task_type="CAUSAL_LM"))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "wide")
    base = load_base_model(ModelConfig(base="tiny:llama"))
    base.config.use_cache = True
    ref_model = PeftModel.from_pretrained(base, str(tmp_path / "wide")).eval()
    x = torch.tensor([prompts[1]])
    with torch.no_grad():
        expected = ref_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12,
                                      do_sample=False, pad_token_id=engine.pad_id,
                                      eos_token_id=engine.tokenizer.eos_token_id)[0, x.shape[1]:].tolist()
    # Execute
    engine.load_adapter("wide@v1", tmp_path / "wide")
    got = engine.generate([prompts[1], prompts[1]], GREEDY, ["wide@v1", "alpha@v1"])
    # Assert: the new adapter matches PEFT, and the rank-4 adapter is unchanged by the wider stacks
    assert got[0].token_ids == expected
    assert got[1].token_ids == peft_reference("alpha", prompts[1], 12)
    engine.unload_adapter("wide@v1")


def test_incremental_text_equals_full_decode(tiny_tok):
    # Prepare: arbitrary ids, many of them partial UTF-8 byte sequences of the byte-level tokenizer
    import random

    rng = random.Random(3)
    for _ in range(20):
        ids = [rng.randrange(3, len(tiny_tok)) for _ in range(40)]
        tracker = TextTracker(tiny_tok, [])
        # Execute
        streamed = "".join(tracker.add(t)[0] for t in ids) + tracker.flush()
        # Assert
        assert streamed == tiny_tok.decode(ids, skip_special_tokens=True)
