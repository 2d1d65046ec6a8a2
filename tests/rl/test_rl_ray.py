"""GRPO on Ray: reward functions that raise, hang or crash are reported without stopping anything, and a
2-worker GRPO run through Ray Train (engine rollout actor, a failing and a hanging reward) resumes."""

import json
from pathlib import Path

import numpy as np
import pytest

from fineray.rl.config import RewardSpec
from fineray.rl.rewards import score_completions
from fineray.train.config import load_config

pytestmark = pytest.mark.integration

USER_REWARDS = '''
import os, time

def shout(prompts, completions, **kwargs):
    return [float(c.isupper()) for c in completions]

def broken(prompts, completions, **kwargs):
    raise RuntimeError("reward service down")

def stuck(prompts, completions, **kwargs):
    time.sleep(600)

def crash(prompts, completions, **kwargs):
    os._exit(3)

def wrong_length(prompts, completions, **kwargs):
    return [1.0] * (len(completions) + 1)
'''


@pytest.fixture
def user_rewards(tmp_path: Path) -> Path:
    path = tmp_path / "user_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_rewards_that_raise_hang_or_crash_are_reported_not_fatal(user_rewards: Path, shared_ray):
    specs = [RewardSpec(name="exact_match"), RewardSpec(function=f"{user_rewards}:shout", weight=2.0),
             RewardSpec(function=f"{user_rewards}:broken"), RewardSpec(function=f"{user_rewards}:stuck", timeout_s=2),
             RewardSpec(function=f"{user_rewards}:crash"), RewardSpec(function=f"{user_rewards}:wrong_length")]
    completions = ["YES", "no", "maybe"]
    columns = {"references": ["YES", "yes", "maybe"], "completion_tokens": [1, 1, 1], "records": [{}, {}, {}]}
    res = score_completions(specs, ["q"] * 3, completions, columns, [[]] * 3, chunk=2)
    assert res.labels == ["exact_match", "shout", "broken", "stuck", "crash", "wrong_length"]
    assert res.scores[:, 0].tolist() == [1.0, 0.0, 1.0] and res.scores[:, 1].tolist() == [1.0, 0.0, 0.0]
    assert np.isnan(res.scores[:, 2:]).all()
    assert "RuntimeError: reward service down" in res.failures["broken"][0] and len(res.failures["broken"]) == 2
    assert res.failures["stuck"][0].startswith("timed out after 2 s")
    assert res.failures["crash"] and res.failures["wrong_length"][0].startswith("TypeError")
    assert res.total([1, 2, 1, 1, 1, 1]).tolist() == [3.0, 0.0, 1.0]  # missing scores add 0


def test_grpo_through_ray_train_with_two_workers_resumes(tmp_path: Path, user_rewards: Path, shared_ray):
    from fineray.rl import run_rl

    rl = ("rl={num_generations: 4, prompts_per_step: 2, max_new_tokens: 8, eval_prompts: 2, "
          "rollout: {backend: engine}, rewards: [{name: length_penalty, args: {limit: 24, window: 20}}, "
          f"{{function: '{user_rewards}:broken'}}, {{function: '{user_rewards}:stuck', timeout_s: 1}}]}}")
    cfg = load_config(None, [
        "model.base=tiny:llama", "data.train=fineray:support-tickets", "data.validation=fineray:support-tickets/val",
        "data.max_examples=32", "train.max_steps=2", "train.eval_every=2", "train.batch_size=4", "train.lr=1e-2",
        "train.eval_on_start=true", "lora.r=4", "scaling.num_workers=2", "cluster.num_cpus=2",
        f"output.dir={tmp_path}/runs", f"output.registry={tmp_path}/adapters", "output.name=tiny-grpo",
        "eval.enabled=false", rl])
    summary = run_rl(cfg, progress=False)

    run = tmp_path / "runs" / "tiny-grpo"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "val_reward_mean" in rows[0] and "val_reward_mean" in rows[2]
    for key in ("reward_mean", "reward_std", "reward_length_penalty", "completion_len", "kl", "clip_frac",
                "rollout_s", "reward_s", "train_s"):
        assert key in rows[1]
    assert rows[1]["reward_broken_failed"] == 2 and rows[1]["reward_stuck_failed"] == 2  # one call per worker
    assert 0 < rows[1]["completion_len"] <= 8 and rows[1]["reward_s"] >= 1.0
    assert summary["rollout"] == "engine" and (run / "reward.png").is_file() and (run / "adapter").is_dir()
    from fineray.train.registry import AdapterRegistry

    lineage = AdapterRegistry(str(tmp_path / "adapters")).get("tiny-grpo").manifest["lineage"]
    assert lineage["algorithm"] == "grpo" and lineage["reward_functions"][0].get("name") == "length_penalty"

    cfg.train.max_steps = 3  # same run name: continues from the step-2 checkpoint
    again = run_rl(cfg, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert again["steps"] == 3 and [r["step"] for r in rows] == [0, 1, 2, 3]
