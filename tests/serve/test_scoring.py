"""`fineray score`: a registered reward model scores conversations offline on Ray Data, in input order, with the
same scores as the model in this process; bad records and non-reward adapters are named."""

from __future__ import annotations

import json

import pytest

from fineray.serve.scoring import score_offline
from fineray.train.config import load_config
from fineray.train.registry import AdapterRegistry

pytestmark = pytest.mark.integration


def test_reward_model_scores_conversations_offline(tmp_path, adapter_dirs, shared_ray):
    # Prepare: a reward model (LoRA + score head) for tiny:llama, registered with kind `reward`
    import torch

    from fineray.train.reward_model import RewardScorer, load_reward_for_training

    torch.manual_seed(0)
    _, model = load_reward_for_training(load_config(None, ["model.base=tiny:llama", "objective=reward"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(tmp_path / "rm")
    reg = AdapterRegistry(str(tmp_path / "registry"))
    reg.register("rm", tmp_path / "rm", base_model="tiny:llama", method="lora", kind="reward")
    reg.register("alpha", adapter_dirs["alpha"], base_model="tiny:llama", method="lora")
    convs = [[{"role": "user", "content": f"order {i} late?"}, {"role": "assistant", "content": "yes" * (i + 1)}]
             for i in range(3)]
    lines = [json.dumps({"id": 0, "messages": convs[0]}), "not json",
             json.dumps({"id": 1, "prompt": "order 1 late?", "response": "yesyes"}),
             json.dumps({"id": 2, "prompt": convs[2][:1], "response": convs[2][1]["content"]})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    # Execute
    stats = score_offline("rm", tmp_path / "in.jsonl", tmp_path / "out.jsonl", registry=str(reg.root))
    # Assert
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert stats["records"] == 4 and stats["errors"] == 1 and "error" in out[1]
    good = [o for o in out if "score" in o]
    assert [o["id"] for o in good] == [0, 1, 2] and good[0]["model"] == "rm@v1"
    direct = RewardScorer("rm", str(reg.root)).score(convs)
    assert [o["score"] for o in good] == pytest.approx(direct, rel=1e-5)
    assert len(set(direct)) == 3
    with pytest.raises(ValueError, match="alpha@v1 is not a reward model"):
        score_offline("alpha", tmp_path / "in.jsonl", tmp_path / "x.jsonl", registry=str(reg.root))

    # The same model as a GRPO reward: an actor scores the prompt + completion conversations.
    import ray

    from fineray.rl.config import RewardSpec
    from fineray.rl.rewards import RewardModelWorker, score_completions

    actor = ray.remote(RewardModelWorker).options(num_cpus=0).remote("rm", str(reg.root))
    try:
        res = score_completions([RewardSpec(model="rm", weight=2.0)], ["q"] * 3, [c[1]["content"] for c in convs],
                                {"references": [None] * 3, "completion_tokens": [1] * 3, "records": [{}] * 3},
                                convs, {"rm": actor})
    finally:
        ray.kill(actor)
    assert res.scores[:, 0].tolist() == pytest.approx(direct, rel=1e-5) and not res.failures
    assert res.total([2.0]).tolist() == pytest.approx([2 * d for d in direct], rel=1e-5)
