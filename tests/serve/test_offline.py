"""`generate_offline`: Ray Data across two workers, output in input order, tokens equal to PEFT's greedy
generation, and bad records reported per line instead of failing the run."""

from __future__ import annotations

import json

import pytest

from fineray.serve import generate_offline
from fineray.train.registry import AdapterRegistry

pytestmark = pytest.mark.integration


def test_generate_offline_in_order_with_per_record_errors(tmp_path, adapter_dirs, tiny_tok, peft_reference,
                                                         shared_ray):
    # Prepare
    reg = AdapterRegistry(str(tmp_path / "registry"))
    reg.register("alpha", adapter_dirs["alpha"], base_model="tiny:llama", method="lora")
    records = []
    for i in range(10):
        if i % 2:
            records.append({"id": i, "messages": [{"role": "user", "content": f"refund order {i}"}]})
        else:
            records.append({"id": i, "prompt": f"Ticket {i}: the app", "max_tokens": 4})
    lines = [json.dumps(r) for r in records]
    lines.insert(3, "this is not json")
    lines.insert(7, json.dumps({"id": "no-prompt"}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    # Execute
    summary = generate_offline("alpha", tmp_path / "in.jsonl", tmp_path / "out.jsonl", registry=str(reg.root),
                               num_workers=2, max_tokens=6, batch_size=3)
    # Assert
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 12 and summary["records"] == 12 and summary["errors"] == 2
    assert "invalid JSON" in out[3]["error"] and "needs `messages`" in out[7]["error"]
    good = [o for o in out if "error" not in o]
    assert [o["id"] for o in good] == list(range(10))
    for o in good:
        if "messages" in o:
            text = tiny_tok.apply_chat_template(o["messages"], tokenize=False, add_generation_prompt=True)
            ids = tiny_tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tiny_tok(o["prompt"])["input_ids"]
        expected = peft_reference("alpha", ids, o.get("max_tokens", 6))
        assert o["output"] == tiny_tok.decode(expected, skip_special_tokens=True)
        assert o["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected)}
        assert o["model"] == "alpha@v1"
    assert summary["completion_tokens"] == sum(o["usage"]["completion_tokens"] for o in good)
