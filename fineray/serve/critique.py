"""`fineray generate --critique`: constitutional self-critique data on Ray Data (Bai et al. 2022, "Constitutional
AI"): the model answers each prompt, critiques its answer against every principle of a constitution and
revises it, principle after principle.

A constitution file (YAML):

    system_prompt: You are a support triage assistant. Reply with JSON only.   # optional
    max_tokens: 128                                                           # per generation
    principles:
      - name: json_only
        critique: Point out anything in your answer that is not part of a single JSON object.
        revision: Rewrite your answer as exactly one JSON object, nothing else.

Outputs, in input order: preference pairs (`{"prompt": [messages], "chosen": final revision, "rejected":
first answer, "critiques": [...]}`, ready for `objective: dpo`; pairs whose revision did not change the answer
are left out and counted) and SFT data (`{"messages": [..., {"role": "assistant", "content": revision}]}`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fineray.serve.offline import BatchGenerator, map_lines, resolve_model

__all__ = ["Constitution", "CritiqueGenerator", "Principle", "generate_critique", "load_constitution"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Principle(_Section):
    """One principle: the critique request and the revision request (user turns)."""

    name: str
    critique: str
    revision: str


class Constitution(_Section):
    """A constitution: principles applied in order, the system prompt for answering, sampling settings."""

    principles: list[Principle] = Field(min_length=1)
    system_prompt: str | None = None
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0)


def load_constitution(path: str | Path) -> Constitution:
    """Read and validate a constitution YAML; errors name the file and key."""
    from fineray.train.config import ConfigError, format_validation_error, load_yaml

    data = load_yaml(path)
    try:
        return Constitution.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path), "constitution")) from None


class CritiqueGenerator(BatchGenerator):
    """Ray Data callable class: prompts in, answer + critique/revision chain out (one JSON line each)."""

    def __init__(self, constitution: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.c = Constitution.model_validate(constitution)

    def _generate(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        from fineray.serve.sampling import SamplingParams

        tok = self.engine.tokenizer
        ids = [tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for c in conversations]
        params = SamplingParams(max_tokens=self.c.max_tokens, temperature=self.c.temperature)
        return [o.text.strip() for o in self.engine.generate(ids, params, [self.key] * len(ids))]

    def _conversation(self, line: str) -> list[dict[str, str]]:
        rec = json.loads(line)
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            msgs = [dict(m) for m in rec["messages"]]
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            msgs = [{"role": "user", "content": rec["prompt"]}]
        else:
            raise ValueError("a record needs `messages` (list) or `prompt` (string)")
        if self.c.system_prompt and msgs[0].get("role") != "system":
            msgs.insert(0, {"role": "system", "content": self.c.system_prompt})
        return msgs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lines = list(batch["text"])
        out: list[str | None] = [None] * len(lines)
        convs: dict[int, list[dict[str, str]]] = {}
        for i, line in enumerate(lines):
            try:
                convs[i] = self._conversation(line)
            except Exception as e:  # noqa: BLE001 - one bad record must not fail the run
                out[i] = json.dumps({"input": str(line)[:200], "error": str(e)})
        idx = list(convs)
        if idx:
            first = self._generate([convs[i] for i in idx])
            current, steps = list(first), [[] for _ in idx]
            for p in self.c.principles:  # one batched generation per stage, every prompt at once
                asked = [convs[i] + [{"role": "assistant", "content": a}, {"role": "user", "content": p.critique}]
                         for i, a in zip(idx, current)]
                critiques = self._generate(asked)
                current = self._generate([c + [{"role": "assistant", "content": k},
                                               {"role": "user", "content": p.revision}]
                                          for c, k in zip(asked, critiques)])
                for s, k, r in zip(steps, critiques, current):
                    s.append({"principle": p.name, "critique": k, "revision": r})
            for j, i in enumerate(idx):
                out[i] = json.dumps({"prompt": convs[i], "chosen": current[j], "rejected": first[j],
                                     "critiques": steps[j], "model": self.model})
        return {"text": np.array(out, dtype=object)}


def generate_critique(constitution: str | Path, model_ref: str | None, input_path: str | Path,
                      output_path: str | Path, sft_output: str | Path | None = None, registry: str = "adapters",
                      base: str | None = None, num_workers: int = 2, batch_size: int = 16, use_gpu: bool = False,
                      address: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Self-critique every prompt of `input_path`; write preference pairs to `output_path` and SFT data to
    `sft_output` (default: `<output stem>.sft.jsonl`). Both files appear complete or not at all.

    Returns:
        Summary: records, pairs, unchanged (revision equal to the answer), errors, wall_s, outputs.
    """
    t0 = time.perf_counter()
    c = load_constitution(constitution)
    inp, outp = Path(input_path), Path(output_path)
    if not inp.is_file():
        raise FileNotFoundError(f"input file not found: {inp}")
    sftp = Path(sft_output) if sft_output else outp.with_name(outp.stem + ".sft.jsonl")
    adapter_ref, adapter_path, base = resolve_model(model_ref, registry, base)
    lines = [line for line in inp.read_text().splitlines() if line.strip()]
    rows = map_lines(lines, CritiqueGenerator,
                     {"constitution": c.model_dump(), "base": base, "adapter_path": adapter_path,
                      "adapter_ref": adapter_ref, "defaults": {}},
                     num_workers=num_workers, batch_size=batch_size, use_gpu=use_gpu, address=address,
                     num_cpus=num_cpus)
    stats = {"records": 0, "pairs": 0, "unchanged": 0, "errors": 0}
    outp.parent.mkdir(parents=True, exist_ok=True)
    sftp.parent.mkdir(parents=True, exist_ok=True)
    tmp, tmp_sft = outp.with_name(outp.name + ".partial"), sftp.with_name(sftp.name + ".partial")
    with tmp.open("w") as f, tmp_sft.open("w") as g:
        for rec in rows:
            stats["records"] += 1
            if "error" in rec:
                stats["errors"] += 1
                continue
            g.write(json.dumps({"messages": rec["prompt"] + [{"role": "assistant", "content": rec["chosen"]}]}) + "\n")
            if rec["chosen"].strip() == rec["rejected"].strip():
                stats["unchanged"] += 1
                continue
            stats["pairs"] += 1
            f.write(json.dumps(rec) + "\n")
    tmp.replace(outp)
    tmp_sft.replace(sftp)
    return {**stats, "wall_s": round(time.perf_counter() - t0, 2), "model": adapter_ref or base,
            "pairs_output": str(outp), "sft_output": str(sftp)}
