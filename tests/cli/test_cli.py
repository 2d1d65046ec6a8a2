"""The `fineray` CLI end to end on the tiny model (real subprocesses), and its error messages (in-process)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.runner import invoke

FINERAY = [sys.executable, "-m", "fineray.cli"]


def run(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`fineray ARGS` as a user's shell runs it: no RAY_ADDRESS (this process's pinned test cluster is not theirs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(COLUMNS="200", NO_COLOR="1")
    p = subprocess.run([*FINERAY, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"fineray {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.mark.integration
def test_train_resume_list_show_eval_export(tmp_path: Path, alpaca_file: Path, shared_ray):
    """The main path end to end: `fineray train` as a real console-script subprocess (its own private Ray, two
    Ray Train workers, held-out eval, registry), then the same run name again in-process (Ray Train resumes its
    latest checkpoint), and the registry, eval and export commands around them (in-process: the same CLI without
    a Python start each).

    The first training runs beside a second Ray instance on the machine (this test process's own): its private
    cluster pins its address for every process it starts, so Ray Train's placement-group cleaner does not
    fail with "Found multiple active Ray instances"."""
    import ray

    from fineray.base.connect import init_ray
    from fineray.train.registry import AdapterRegistry, sha256_file

    if not ray.is_initialized():  # an earlier test stopped the shared one: start it again as the other instance
        init_ray(None, 2)
    # Train from a versioned dataset (`fineray data prepare` -> dataset:nums@v1); the adapter records it.
    invoke("data", "prepare", str(alpaca_file), "--name", "nums", "--registry", "reg", "--no-progress", cwd=tmp_path)
    cfg = tmp_path / "my.yaml"
    cfg.write_text("model: {base: 'tiny:llama'}\ndata: {train: 'dataset:nums', validation: 0.2}\n"
                   "train: {max_steps: 6, eval_every: 3, batch_size: 4, lr: 0.01}\n"
                   "scaling: {num_workers: 2}\nlora: {r: 4}\n"
                   "output: {dir: runs, registry: reg, name: cli-run}\n"
                   f"eval: {{data: {alpaca_file}, max_examples: 3, max_new_tokens: 4, metrics: [exact_match]}}\n")
    p = run("train", str(cfg), "--no-progress", "--json", "out.json", cwd=tmp_path)
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["steps"] == 6 and summary["registry_ref"] == "cli-run@v1"
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert "held-out evaluation" in p.stdout and "exact_match" in p.stdout
    assert "multiple active Ray instances" not in p.stdout + p.stderr
    run_dir = tmp_path / "runs" / "cli-run"
    assert {"adapter", "config.yaml", "metrics.jsonl", "loss.png", "summary.json"} <= {x.name for x in run_dir.iterdir()}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and "val_loss" in rows[2]
    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ("wall_s", "tokens_per_s", "val_loss", "base_metrics", "tuned_metrics"):
        assert key in saved
    assert saved["tuned_metrics"]["n"] == 3 and "exact_match" in saved["tuned_metrics"]
    assert len([x for x in (run_dir / "ray").glob("checkpoint_*") if x.is_dir()]) == 2  # num_to_keep=2
    reg = AdapterRegistry(str(tmp_path / "reg"))
    v1 = reg.get("cli-run")
    assert reg.verify(v1.ref) == [] and v1.manifest["method"] == "lora"
    assert v1.manifest["files"]["adapter_model.safetensors"] == sha256_file(run_dir / "adapter" / "adapter_model.safetensors")

    # Same run name, more steps: Ray Train V2 restores the latest checkpoint (step 6) and continues.
    invoke("train", str(cfg), "train.max_steps=8", "eval.enabled=false", "--no-progress", cwd=tmp_path)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-3:] == [6, 7, 8] and reg.get("cli-run").version == 2

    listing = invoke("adapters", "list", "--registry", "reg", cwd=tmp_path).stdout
    assert "cli-run@v1" in listing and "cli-run@v2" in listing and "tiny:llama" in listing
    shown = json.loads(invoke("adapters", "show", "cli-run@v1", "--registry", "reg", cwd=tmp_path).stdout)
    assert shown["hyperparameters"]["lora"]["r"] == 4 and shown["ref"] == "cli-run@v1"
    assert shown["lineage"]["datasets"] == ["nums@v1"] and shown["lineage_chain"] == "cli-run@v1 (data: dataset:nums@v1)"

    ev = invoke("eval", str(cfg), "--adapter", "cli-run", "eval.general_text=null", cwd=tmp_path).stdout
    assert "base" in ev and "tuned" in ev

    invoke("export", "cli-run", "merged", "--registry", "reg", cwd=tmp_path)
    merged = tmp_path / "merged"
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert (merged / "tokenizer_config.json").is_file()

    invoke("adapters", "rm", "cli-run@v1", "--registry", "reg", "--yes", cwd=tmp_path)
    assert "cli-run@v1" not in invoke("adapters", "list", "--registry", "reg", cwd=tmp_path).stdout


def test_bad_inputs_give_clear_errors(tmp_path: Path):
    (tmp_path / "broken.yaml").write_text("train:\n  lr: [1\n")
    p = invoke("train", "broken.yaml", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "broken YAML at" in p.stderr and "broken.yaml:" in p.stderr

    (tmp_path / "typo.yaml").write_text("train:\n  lrr: 1\n")
    p = invoke("train", "typo.yaml", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "train.lrr: unknown key" in p.stderr

    p = invoke("train", "missing.yaml", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "config file not found" in p.stderr

    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": broken}\n')
    (tmp_path / "data.yaml").write_text("model: {base: 'tiny:llama'}\ndata: {train: bad.jsonl}\n")
    p = invoke("train", "data.yaml", "--no-progress", cwd=tmp_path, check=False)
    assert p.returncode != 0 and "bad.jsonl:2: invalid JSON" in (p.stderr + p.stdout)

    p = invoke("adapters", "show", "nope", "--registry", str(tmp_path / "reg"), cwd=tmp_path, check=False)
    assert p.returncode == 1 and "no adapter named 'nope'" in p.stderr


def test_data_a_run_cannot_use_is_refused_before_ray_starts(tmp_path: Path):
    """Not UTF-8 (named by file and line, no traceback), too few examples for one step, a relative data path
    given as an override (absolute for the workers): all before Ray starts, so no run folder is written."""
    # Prepare
    (tmp_path / "latin.jsonl").write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9"}\n')
    (tmp_path / "small.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 3)
    tiny = ["model.base=tiny:llama", "output.dir=runs", "--no-progress"]
    # Execute
    latin = invoke("train", "data.train=latin.jsonl", *tiny, cwd=tmp_path, check=False)
    small = invoke("train", "data.train=small.jsonl", "data.validation=null", *tiny, cwd=tmp_path, check=False)
    # Assert
    assert latin.returncode == 1 and "latin.jsonl:2: not UTF-8 text (byte 0xe9 at column 21)" in latin.stderr
    assert "Traceback" not in latin.stderr
    assert small.returncode == 1 and ("3 training examples are fewer than one step needs (train.batch_size=4 x "
                                      "scaling.num_workers=2 = 8)") in small.stderr
    assert not (tmp_path / "runs").exists()


def test_preference_and_rl_commands_give_clear_errors(tmp_path: Path):
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n' * 4)
    (tmp_path / "dpo.yaml").write_text("model: {base: 'tiny:llama'}\nobjective: dpo\ndata: {train: sft.jsonl}\n")
    p = invoke("train", "dpo.yaml", "--no-progress", cwd=tmp_path, check=False)
    assert p.returncode == 1 and re.search(r"sft\.jsonl:\d: not a preference pair", p.stderr)

    p = invoke("rl", "dpo.yaml", "objective=sft", "--no-progress", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "no `rl:` section" in p.stderr
    p = invoke("rl", "dpo.yaml", "objective=sft", "rl.rewards=[{name: jsn}]", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "rl.rewards.0" in p.stderr and "unknown built-in reward 'jsn'" in p.stderr
    p = invoke("rl", "dpo.yaml", "objective=sft", "rl.rewards=[{function: nope_module:fn}]", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "cannot load nope_module:fn" in p.stderr

    p = invoke("generate", "--critique", "missing.yaml", "--input", "sft.jsonl", "--output", "o.jsonl", cwd=tmp_path,
            check=False)
    assert p.returncode == 1 and "config file not found: missing.yaml" in p.stderr
    assert not (tmp_path / "o.jsonl").exists()

    p = invoke("submit", "dpo.yaml", "--kind", "rl", "--address", "http://127.0.0.1:1", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "no `rl:` section" in p.stderr
