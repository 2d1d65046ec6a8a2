"""Preference and RL throughput: fineray DPO vs TRL's DPOTrainer + PEFT, and the GRPO step split (rollout /
reward / train) vs TRL's GRPOTrainer without vLLM. Same model, data, order and settings on both sides, offline.

Method (issue 14):
  * Models: random-init Llama shapes (`1b` = Llama-3.2-1B, `8b` = Llama-3-8B, `tiny` for a CPU smoke run; see
    workload.SHAPES), bf16 on GPU, seed 0, SDPA. LoRA r=16, alpha=32, dropout 0, all linear layers.
  * Tokenizer: a word-level tokenizer over the whole vocabulary (`t<id>` <-> id; <pad> 0, <s> 1, </s> 2,
    <unk> 3), so TRL's text pipeline and fineray see exactly the same token ids. Its chat template is the
    user text itself, so prompts render identically on both sides.
  * DPO data: random ids; prompt lengths lognormal (median 256, sigma 0.6, clipped [16, 1024]), chosen and
    rejected lengths lognormal (median 128, sigma 0.6, clipped [8, 512]), each response ending in </s>. Both
    sides see the same pairs in the same order (fineray's sampler order; TRL through a sequential sampler).
    Settings: beta 0.1, sigmoid loss, reference = the same weights with the adapter disabled (TRL's default
    with PEFT; fineray's `dpo.reference: auto`), constant LR 2e-4, fused AdamW, bf16, no gradient
    checkpointing. fineray runs its GPU defaults: chosen+rejected packed in one row with varlen attention,
    chunked per-token log-probs (no logits over the vocabulary), per-block torch.compile.
  * DPO timing: wall clock between the ends of consecutive optimizer steps after `warmup`; tokens = the
    non-padding tokens of both sequences of every pair (prompt + response, twice). Peak memory =
    torch.cuda.max_memory_allocated over the run.
  * GRPO: 8 prompts (random ids, 128 tokens) x 8 completions of up to 128 new tokens per optimizer step
    (random weights rarely emit </s>, so completions run to the limit on both sides), temperature 1,
    micro-batches of 16 completions, beta 0 (no reference), one update per rollout batch, token-level loss
    (TRL `dapo`), reward = bench_rewards.sevens. fineray: `rl_loop` in this process with one rollout engine
    actor (Ray, 0.5 GPU, the serving engine) or the policy itself (`policy` backend); TRL: GRPOTrainer with
    `use_vllm=False`: `trl` = HF `generate` (one left-padded batch of all 64 completions), `trl-cb` = transformers'
    continuous batching (`use_transformers_continuous_batching`), the two non-vLLM generation paths TRL offers.
  * GRPO timing: step = wall clock between the ends of consecutive optimizer steps after `warmup` (both sides);
    rollout = generation (fineray: saving the adapter + the engine call, or the policy's `generate`; TRL: its
    `_generate`), reward = the reward call, train = the rest of the step. gen tok/s = completion tokens / rollout
    s; tok/s = (prompt + completion) tokens / step s. Peak memory = torch.cuda.max_memory_allocated of the
    trainer process; with the engine backend the rollout actor's own peak (a second process holding a second
    copy of the base weights, its static KV slots and CUDA graphs) is reported beside it.

Usage (GPU, one H200; wheels for ray/trl/datasets carried, see bench/make_preference_bundle.sh):
  python bench/preference_throughput.py dpo --cases 1b-dpo8,8b-dpo4 --out $OUT/dpo.jsonl
  python bench/preference_throughput.py grpo --cases 1b-grpo --out $OUT/grpo.jsonl
  python bench/preference_throughput.py table $OUT/dpo.jsonl $OUT/grpo.jsonl
CPU smoke run: python bench/preference_throughput.py dpo --device cpu --cases tiny-dpo (and grpo / tiny-grpo).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from workload import SHAPES, batch_order, build_model, peak_memory, step_clock  # noqa: E402

DPO_CASES = {"tiny-dpo": ("tiny", 4, 4, 1), "1b-dpo8": ("1b", 8, 12, 4), "8b-dpo4": ("8b", 4, 12, 4)}
GRPO_CASES = {"tiny-grpo": ("tiny", 2, 4, 16, 3, 1), "1b-grpo": ("1b", 8, 8, 128, 6, 2)}  # prompts, G, new, steps, warm


def grpo_prompt_len(shape: str) -> int:
    return 128 if shape != "tiny" else 16


# ---------------------------------------------------------------------------------------------------- shared
def word_tokenizer(vocab: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, vocab)}}
    raw = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tok


def text(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def lognormal_lengths(n: int, median: float, lo: int, hi: int, g: torch.Generator) -> list[int]:
    return [int(min(hi, max(lo, round(median * math.exp(0.6 * float(z)))))) for z in torch.randn(n, generator=g)]


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _steps_per_s(ends: list[float], warmup: int) -> float:
    return (len(ends) - warmup) / (ends[-1] - ends[warmup - 1]) if len(ends) > warmup else float("nan")


# ------------------------------------------------------------------------------------------------------- DPO
def dpo_data(shape: str, pairs: int, steps: int) -> tuple[list[tuple[list[int], list[int], list[int]]], list[list[int]]]:
    vocab = SHAPES[shape]["vocab_size"]
    n = pairs * steps
    g = torch.Generator().manual_seed(0)
    p_len = lognormal_lengths(n, 256 if shape != "tiny" else 24, 16, 1024, g)
    c_len, r_len = (lognormal_lengths(n, 128 if shape != "tiny" else 12, 8, 512, g) for _ in range(2))
    rand = [torch.randint(4, vocab, (k,), generator=g).tolist() for k in p_len + c_len + r_len]
    data = [(rand[i], rand[n + i] + [2], rand[2 * n + i] + [2]) for i in range(n)]
    return data, batch_order(n, pairs, 42)[:steps]


def run_dpo_fineray(shape: str, pairs: int, steps: int, warmup: int, device: str,
                    micro_batch_tokens: int | None = None) -> dict[str, Any]:
    """fineray's DPO loop; `micro_batch_tokens` splits each step's pairs into micro-batches of at most that many
    tokens (gradient accumulation inside the step: the same update, a smaller activation peak)."""
    from fineray.train import loop, preference
    from fineray.train.config import load_config
    from fineray.train.model import apply_peft
    from fineray.train.pairs import Pair
    from fineray.train.session import LocalSession
    from fineray.train.templates import IGNORE_INDEX, Tokenized

    data, order = dpo_data(shape, pairs, steps)
    gpu = device == "cuda"
    cfg = load_config(None, [
        "model.base=tiny:llama", "objective=dpo", "dpo.beta=0.1", "lora.r=16", "lora.alpha=32", "lora.dropout=0",
        f"train.batch_size={pairs}", f"train.max_steps={steps}", "train.lr=2e-4", "train.scheduler=constant",
        "train.warmup_ratio=0", "train.eval_every=1000000", "train.grad_clip=null", "data.validation=null",
        f"scaling.use_gpu={str(gpu).lower()}", "data.max_seq_len=4096",
        *([f"train.micro_batch_tokens={micro_batch_tokens}"] if micro_batch_tokens else [])])
    _free(device)
    model = apply_peft(build_model(shape, device), "lora", cfg.lora)
    items = [Pair(Tokenized(p + c, [IGNORE_INDEX] * len(p) + c), Tokenized(p + r, [IGNORE_INDEX] * len(p) + r), str(i))
             for i, (p, c, r) in enumerate(data)]

    class Tok:
        pad_token_id = 0

    preference.PreferenceObjective.load_model = lambda self, cfg, **kw: (Tok(), model)
    preference.PreferenceObjective.build_data = lambda self, cfg, tok, stats: (items, [])
    ends: list[float] = []
    losses: list[float] = []

    class Clocked(LocalSession):
        def progress(self, row: dict[str, Any]) -> None:
            ends.append(time.perf_counter())  # after float(loss): the GPU is in sync
            losses.append(float(row["train_loss"]))

        def report(self, metrics: dict[str, Any], write_checkpoint: Any = None) -> None:
            self.reports.append(dict(metrics))

    with tempfile.TemporaryDirectory() as tmp:
        loop.train_loop(cfg, Clocked(tmp, device=device))
    side = f"fineray-mbt{micro_batch_tokens}" if micro_batch_tokens else "fineray"
    return _dpo_row(side, shape, pairs, data, order, ends, losses, warmup)


def _dpo_row(side: str, shape: str, pairs: int, data: list, order: list[list[int]], ends: list[float],
             losses: list[float], warmup: int) -> dict[str, Any]:
    timed = order[warmup:len(ends)]
    tokens = sum(2 * len(data[i][0]) + len(data[i][1]) + len(data[i][2]) for b in timed for i in b)
    secs = ends[-1] - ends[warmup - 1] if len(ends) > warmup else float("nan")
    return {"bench": "dpo", "side": side, "case": f"{shape}-dpo{pairs}", "steps_timed": len(timed),
            "tokens_per_s": tokens / secs, "step_s": secs / max(1, len(timed)), "loss_first": losses[0],
            "loss_last": losses[-1], **peak_memory()}


def run_dpo_trl(shape: str, pairs: int, steps: int, warmup: int, device: str) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    data, order = dpo_data(shape, pairs, steps)
    seq = [i for b in order for i in b]
    ds = Dataset.from_dict({"prompt": [text(data[i][0]) for i in seq],
                            "chosen": [" " + text(data[i][1][:-1]) + "</s>" for i in seq],
                            "rejected": [" " + text(data[i][2][:-1]) + "</s>" for i in seq]})
    _free(device)
    model = build_model(shape, device)
    ends: list[float] = []
    losses: list[float] = []

    class SeqDPO(DPOTrainer):
        def _get_train_sampler(self, *a: Any, **k: Any) -> Any:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=pairs, max_steps=steps, learning_rate=2e-4,
                         lr_scheduler_type="constant", warmup_steps=0, beta=0.1, max_length=None,
                         optim="adamw_torch_fused" if device == "cuda" else "adamw_torch", bf16=device == "cuda",
                         logging_steps=1, save_strategy="no", report_to=[], gradient_checkpointing=False,
                         seed=0, disable_tqdm=True, use_cpu=device == "cpu", dataloader_num_workers=0)
        trainer = SeqDPO(model=model, args=args, train_dataset=ds, processing_class=word_tokenizer(SHAPES[shape]["vocab_size"]),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"), callbacks=[step_clock(device, ends, losses)])
        trainer.train()
    out = _dpo_row("trl", shape, pairs, data, order, ends, losses, warmup)
    del trainer, model
    return out


# ------------------------------------------------------------------------------------------------------ GRPO
def grpo_model_dir(shape: str, device: str, root: Path) -> Path:
    """A saved random-weight model + word tokenizer (the rollout engine and TRL load it like any model)."""
    out = root / f"model-{shape}"
    if not (out / "config.json").exists():
        model = build_model(shape, device)
        model.config.use_cache = True
        model.save_pretrained(out, safe_serialization=True)
        word_tokenizer(SHAPES[shape]["vocab_size"]).save_pretrained(out)
        del model
        _free(device)
    return out


def grpo_prompts(shape: str, n: int, root: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[shape]["vocab_size"]
    path = root / f"prompts-{shape}.jsonl"
    path.write_text("".join(json.dumps({"prompt": text(torch.randint(4, vocab, (grpo_prompt_len(shape),),
                                                                     generator=g).tolist())}) + "\n"
                            for _ in range(n)))
    return path


def run_grpo_fineray(case: tuple, device: str, root: Path, backend: str) -> dict[str, Any]:
    import ray

    from fineray.rl._loop import rl_loop
    from fineray.rl._rollout import RolloutWorker
    from fineray.train.config import load_config
    from fineray.train.session import LocalSession

    shape, prompts, group, new, steps, warmup = case
    model_dir = grpo_model_dir(shape, device, root)
    data = grpo_prompts(shape, prompts * steps * 2, root)
    gpu = device == "cuda"
    rl = (f"rl={{num_generations: {group}, prompts_per_step: {prompts}, max_new_tokens: {new}, eval_prompts: 0, "
          f"beta: 0, rollout: {{backend: {backend}}}, rewards: [{{function: '{BENCH / 'bench_rewards.py'}:sevens'}}]}}")
    cfg = load_config(None, [f"model.base={model_dir}", f"data.train={data}", "data.validation=null",
                             "data.format=prompt", "data.max_seq_len=1024", "lora.r=16", "lora.alpha=32",
                             "lora.dropout=0", "train.batch_size=16", f"train.max_steps={steps}", "train.lr=2e-4",
                             "train.scheduler=constant", "train.warmup_ratio=0", "train.eval_every=1000000",
                             "scaling.num_workers=1", f"scaling.use_gpu={str(gpu).lower()}", rl])
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, num_gpus=1 if gpu else 0, include_dashboard=False)

    class MeasuredRolloutWorker(RolloutWorker):
        def peak_alloc_gib(self) -> float:
            return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")

    actors = []
    if backend == "engine":
        actors = [ray.remote(MeasuredRolloutWorker).options(num_gpus=0.5 if gpu else 0, max_concurrency=2).remote(
            str(model_dir), device=device, max_batch_size=prompts * group)]
    _free(device)
    ends: list[float] = []

    class Clocked(LocalSession):
        def progress(self, row: dict[str, Any]) -> None:
            ends.append(time.perf_counter())  # after the step's metrics (float()): the GPU is in sync
            super().progress(row)

    engine_mem: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            state = rl_loop(cfg, Clocked(tmp, device=device), services={"rollout_actors": actors})
        if actors and gpu:
            try:
                engine_mem["engine_peak_alloc_gib"] = ray.get(actors[0].peak_alloc_gib.remote(), timeout=60)
            except Exception as e:  # noqa: BLE001 - keep the timings
                engine_mem["engine_mem_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
    rows = [r for r in state.history if "rollout_s" in r][warmup:]
    split = {k: sum(r[k] for r in rows) / len(rows) for k in ("rollout_s", "reward_s")}
    step = (ends[-1] - ends[warmup - 1]) / len(rows)
    completion = sum(r["completion_len"] for r in rows) / len(rows)
    return {"bench": "grpo", "side": f"fineray-{backend}", "case": f"{shape}-grpo", "steps_timed": len(rows),
            "step_s": step, **split, "train_s": step - split["rollout_s"] - split["reward_s"],
            **_grpo_tokens(shape, prompts * group, completion, step, split["rollout_s"]),
            "reward_last": rows[-1]["reward_mean"], **peak_memory(), **engine_mem}


def _grpo_tokens(shape: str, n: int, completion_len: float, step_s: float, rollout_s: float) -> dict[str, float]:
    return {"completion_len": completion_len, "gen_tokens_per_s": n * completion_len / rollout_s,
            "tokens_per_s": n * (grpo_prompt_len(shape) + completion_len) / step_s}


def run_grpo_trl(case: tuple, device: str, root: Path, continuous: bool = False) -> dict[str, Any]:
    import dataclasses

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(BENCH))
    from bench_rewards import sevens

    shape, prompts, group, new, steps, warmup = case
    model_dir = grpo_model_dir(shape, device, root)
    path = grpo_prompts(shape, prompts * steps * 2, root)
    ds = Dataset.from_list([json.loads(x) for x in path.read_text().splitlines()])
    _free(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                                 attn_implementation="sdpa").to(device)
    micro = min(16, prompts * group)
    want = {"output_dir": "", "per_device_train_batch_size": micro, "gradient_accumulation_steps": prompts * group // micro,
            "num_generations": group, "max_completion_length": new, "temperature": 1.0, "top_p": 1.0, "beta": 0.0,
            "num_iterations": 1, "loss_type": "dapo", "use_vllm": False, "learning_rate": 2e-4,
            "lr_scheduler_type": "constant", "warmup_steps": 0, "max_steps": steps, "bf16": device == "cuda",
            "logging_steps": 1, "save_strategy": "no", "report_to": [], "seed": 0, "disable_tqdm": True,
            "use_cpu": device == "cpu", "gradient_checkpointing": False, "log_completions": False,
            "use_transformers_continuous_batching": continuous}
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    if set(want) - fields:  # a silently dropped setting would change the comparison
        raise ValueError(f"GRPOConfig lacks {sorted(set(want) - fields)}")
    times: dict[str, list[float]] = {"rollout_s": [], "reward_s": []}
    ends: list[float] = []
    lengths: list[float] = []

    class Lengths(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    with tempfile.TemporaryDirectory() as tmp:
        want["output_dir"] = tmp
        args = GRPOConfig(**{k: v for k, v in want.items() if k in fields})
        trainer = GRPOTrainer(model=model, reward_funcs=[sevens], args=args, train_dataset=ds,
                              processing_class=word_tokenizer(SHAPES[shape]["vocab_size"]),
                              peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"),
                              callbacks=[step_clock(device, ends, []), Lengths()])
        for meth, key in (("_generate", "rollout_s"), ("_calculate_rewards", "reward_s")):
            orig = getattr(trainer, meth)

            def timed(*a: Any, _orig: Any = orig, _key: str = key, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return _orig(*a, **k)
                finally:
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[_key].append(time.perf_counter() - t0)

            setattr(trainer, meth, timed)
        trainer.train()
    step_s = [b - a for a, b in itertools.pairwise(ends)][warmup - 1:]
    n = len(step_s)
    rollout = sum(times["rollout_s"][warmup:warmup + n]) / max(1, n)
    reward = sum(times["reward_s"][warmup:warmup + n]) / max(1, n)
    step = sum(step_s) / max(1, n)
    timed = lengths[warmup:warmup + n]
    completion = sum(timed) / len(timed) if timed else float("nan")
    out = {"bench": "grpo", "side": "trl-cb" if continuous else "trl", "case": f"{shape}-grpo", "steps_timed": n,
           "step_s": step, "rollout_s": rollout, "reward_s": reward, "train_s": step - rollout - reward,
           **_grpo_tokens(shape, prompts * group, completion, step, rollout), **peak_memory()}
    del trainer, model
    return out


# ----------------------------------------------------------------------------------------------------- table
def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    dpo = [r for r in rows if r.get("bench") == "dpo" and "error" not in r]
    if dpo:
        lines += ["| DPO case | side | tok/s | step s | peak alloc GiB | loss first -> last | tok/s vs TRL | mem vs TRL |",
                  "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
        for r in dpo:
            base = next((b for b in dpo if b["case"] == r["case"] and b["side"] == "trl"), None)
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and r is not base else ""
            mem = (f"{r['peak_alloc_gib'] / base['peak_alloc_gib']:.2f}x" if base and r is not base
                   and base.get("peak_alloc_gib") else "")
            lines.append(f"| {r['case']} | {r['side']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | "
                         f"{r.get('peak_alloc_gib', float('nan')):.1f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
                         f"| {ratio} | {mem} |")
    grpo = [r for r in rows if r.get("bench") == "grpo" and "error" not in r]
    if grpo:
        lines += ["", "| GRPO case | side | step s | rollout s | reward s | train s | gen tok/s | tok/s | "
                      "completion len | peak alloc GiB (trainer) | peak alloc GiB (engine actor) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in grpo:
            eng = f"{r['engine_peak_alloc_gib']:.1f}" if "engine_peak_alloc_gib" in r else ""
            lines.append(f"| {r['case']} | {r['side']} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | "
                         f"{r['reward_s']:.3f} | {r['train_s']:.2f} | {r.get('gen_tokens_per_s', float('nan')):,.0f} | "
                         f"{r.get('tokens_per_s', float('nan')):,.0f} | {r.get('completion_len', float('nan')):.1f} | "
                         f"{r.get('peak_alloc_gib', float('nan')):.1f} | {eng} |")
    lines += [f"error: {r['side']} {r['case']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", choices=["dpo", "grpo", "table"])
    ap.add_argument("files", nargs="*", help="table: JSONL files to merge")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", default=None)
    ap.add_argument("--side", default="both", help="dpo: fineray | fineray-mbtN | trl | both; grpo: engine,policy,trl,trl-cb (any)")
    ap.add_argument("--out", default=None, help="append one JSON line per run here")
    ap.add_argument("--workdir", default="/tmp/fineray-pref-bench", help="saved random models and prompts")
    a = ap.parse_args()
    if a.bench == "table":
        print(table([json.loads(x) for f in a.files if Path(f).exists() for x in Path(f).read_text().splitlines()
                     if x.strip()]))
        return
    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    if a.bench == "dpo":
        names = (a.cases or ("tiny-dpo" if a.device == "cpu" else "1b-dpo8,8b-dpo4")).split(",")
        sides = ["trl", "fineray"] if a.side == "both" else a.side.split(",")
        runs = [(n, s) for n in names for s in sides]
    else:
        names = (a.cases or ("tiny-grpo" if a.device == "cpu" else "1b-grpo")).split(",")
        sides = ["engine", "policy", "trl"] if a.side == "both" else a.side.split(",")
        runs = [(n, s) for n in names for s in sides]
    for name, side in runs:
        t0 = time.perf_counter()
        try:
            if a.bench == "dpo":
                shape, pairs, steps, warmup = DPO_CASES[name]
                if side == "trl":
                    r = run_dpo_trl(shape, pairs, steps, warmup, a.device)
                else:  # fineray, or fineray-mbtN: micro-batches of at most N tokens
                    mbt = int(side.removeprefix("fineray-mbt")) if side.startswith("fineray-mbt") else None
                    r = run_dpo_fineray(shape, pairs, steps, warmup, a.device, mbt)
            else:
                case = GRPO_CASES[name]
                r = (run_grpo_trl(case, a.device, root, continuous=side == "trl-cb") if side.startswith("trl")
                     else run_grpo_fineray(case, a.device, root, side))
        except Exception as e:  # noqa: BLE001 - record OOMs and failures as rows, keep going
            r = {"bench": a.bench, "side": side, "case": name, "error": f"{type(e).__name__}: {str(e)[:400]}", **peak_memory()}
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(r)
        print("RESULT " + json.dumps(r), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")
        _free(a.device)
    print(table(rows))


if __name__ == "__main__":
    main()
