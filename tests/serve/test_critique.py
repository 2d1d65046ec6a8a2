"""`fineray generate --critique`: answer, critique and revise per principle on Ray Data; preference pairs and
SFT data out, in input order, loadable as training data; bad constitutions and records named."""

from __future__ import annotations

import json

import pytest

from fineray.serve.critique import generate_critique, load_constitution
from fineray.train.config import ConfigError
from fineray.train.data import load_examples
from fineray.train.registry import AdapterRegistry

pytestmark = pytest.mark.integration

CONSTITUTION = """
system_prompt: Reply with JSON only.
max_tokens: 6
principles:
  - {name: json_only, critique: "Is it one JSON object?", revision: Rewrite it as one JSON object.}
  - {name: fields, critique: "Are the fields right?", revision: Fix the fields.}
"""


def test_critique_chain_writes_pairs_and_sft_data(tmp_path, adapter_dirs, shared_ray):
    # Prepare
    reg = AdapterRegistry(str(tmp_path / "registry"))
    reg.register("alpha", adapter_dirs["alpha"], base_model="tiny:llama", method="lora")
    (tmp_path / "constitution.yaml").write_text(CONSTITUTION)
    lines = [json.dumps({"prompt": f"Ticket {i}: my order is late"}) for i in range(3)]
    lines.insert(1, json.dumps({"id": "no prompt"}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    # Execute
    stats = generate_critique(tmp_path / "constitution.yaml", "alpha", tmp_path / "in.jsonl", tmp_path / "pairs.jsonl",
                              registry=str(reg.root), num_workers=1, batch_size=4)
    # Assert
    assert stats["records"] == 4 and stats["errors"] == 1 and stats["pairs"] + stats["unchanged"] == 3
    sft = [json.loads(x) for x in (tmp_path / "pairs.sft.jsonl").read_text().splitlines()]
    assert len(sft) == 3 and [m["role"] for m in sft[0]["messages"]] == ["system", "user", "assistant"]
    assert sft[0]["messages"][1]["content"] == "Ticket 0: my order is late"
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == stats["pairs"]
    for p in pairs:
        assert [c["principle"] for c in p["critiques"]] == ["json_only", "fields"]
        assert p["chosen"] == p["critiques"][-1]["revision"] and p["chosen"] != p["rejected"]
        assert p["model"] == "alpha@v1"
    if pairs:  # the pairs load as preference data (the DPO input)
        exs = load_examples(str(tmp_path / "pairs.jsonl"))
        assert exs[0].rejected == pairs[0]["rejected"] and exs[0].messages[-1]["content"] == pairs[0]["chosen"]
    assert len(load_examples(str(tmp_path / "pairs.sft.jsonl"))) == 3


def test_a_bad_constitution_names_the_key(tmp_path):
    (tmp_path / "c.yaml").write_text("principles:\n  - {name: a, critique: x}\n")
    with pytest.raises(ConfigError, match=r"principles\.0\.revision"):
        load_constitution(tmp_path / "c.yaml")
