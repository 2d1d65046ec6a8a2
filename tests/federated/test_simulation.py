"""The Ray simulation: three silo actors on tiny:llama, non-IID data, secure aggregation (a silo dropping after
sharing its keys in round 2 is recovered); loss falls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fineray.federated import print_federation, run_simulation, simulation
from fineray.federated.global_model import initial_adapter
from fineray.federated.silo import SiloWorker
from fineray.federated.simulation import FederationError
from fineray.federated.wire import pack_tensors, unpack_tensors
from fineray.train.config import load_config
from fineray.train.data import read_records

DATA = Path(__file__).resolve().parents[2] / "configs" / "data" / "federated"


def _cfg(tmp: Path, **fed):
    cfg = load_config(None, ["model.base=tiny:llama", "lora.r=8", "lora.alpha=16", "lora.dropout=0",
                             "train.batch_size=8", "train.lr=3e-3", "train.scheduler=constant", "train.warmup_ratio=0",
                             "data.max_seq_len=256", "data.format=alpaca", f"output.dir={tmp / 'runs'}",
                             f"output.registry={tmp / 'reg'}", "output.name=sim"])
    silos = [{"name": n, "data": str(DATA / f"{n}.jsonl"), "num_cpus": 0.5} for n in ("acme", "globex", "initech")]
    silos[0]["resources"] = {"silo:acme": 1}
    cfg.federated = {"silos": silos, "rounds": 2, "local_steps": 6, "round_timeout_s": 300,
                     "eval_data": "fineray:support-tickets/val", "eval_max_examples": 16, "threads_per_silo": 1,
                     **fed}
    return cfg


@pytest.mark.integration
def test_three_silo_simulation_lowers_global_validation_loss(tmp_path: Path, shared_ray, monkeypatch, capsys):
    # Prepare: secure aggregation (majority threshold: 2 of 3); in round 2 initech's actor fails after it
    # shared its keys, before it sends its masked vector (a class defined here travels to Ray by value).
    class DropsInRound2(SiloWorker):
        def secagg_mask(self, task):
            if self.name == "initech" and task["round"] == 2:
                raise RuntimeError("machine lost after sharing its keys")
            return super().secagg_mask(task)

    monkeypatch.setattr(simulation, "SiloWorker", DropsInRound2)
    cfg = _cfg(tmp_path, baselines=True, secure_aggregation={"enabled": True, "clip": 4.0})
    # Execute
    result = run_simulation(cfg, progress=False)
    print_federation(result, Console(width=200))
    # Assert: round 1 aggregated all three silos; round 2 completed without initech (no re-run), and its
    # global adapter is the plain example-weighted mean of the two survivors' own updates.
    assert [r["status"] for r in result.rounds] == ["ok", "ok"]
    assert result.rounds[0]["accepted"] == ["acme", "globex", "initech"] and result.rounds[0]["dropped"] == []
    assert result.rounds[1]["accepted"] == ["acme", "globex"] and result.rounds[1]["dropped"] == ["initech"]
    run = Path(result.run_dir)
    alive = ["acme", "globex"]
    silo_dir = {n: run / "silos" / n for n in alive}
    updates = {n: unpack_tensors((silo_dir[n] / "round_000002" / "update.safetensors").read_bytes())[0] for n in alive}
    counts = {n: len(read_records(str(silo_dir[n] / "data" / "train.jsonl"))) for n in alive}
    final = load_file(str(run / "federation" / "round_000002" / "global_adapter.safetensors"))
    for k, v in final.items():
        plain = sum(updates[n][k].double() * counts[n] for n in alive) / sum(counts.values())
        torch.testing.assert_close(v.double(), plain, atol=1e-5, rtol=0)
    # ... and the global adapter got better on every silo's validation set and on the global held-out set.
    means = [result.initial_eval["mean_val"]] + [r["eval"]["mean_val"] for r in result.rounds]
    held = [result.initial_eval["held_out"]] + [r["eval"]["held_out"] for r in result.rounds]
    assert means[0] - 0.1 > means[1] > means[2] and held[0] - 0.1 > held[1] > held[2]
    methods = {r["method"]: r for r in result.comparison}
    assert set(methods) == {"local-only", "federated", "centralised"}
    assert methods["federated"]["mean_val_loss"] == pytest.approx(means[-1], abs=1e-4)
    assert all(isinstance(r["held_out_loss"], float) for r in result.comparison)
    assert (run / "curves.png").stat().st_size > 1000 and len((run / "rounds.jsonl").read_text().splitlines()) == 2
    assert result.registry_ref == "sim@v1"
    manifest = json.loads((tmp_path / "reg" / "sim" / "v1" / "manifest.json").read_text())
    assert manifest["lineage"]["federation"]["silos"] == ["acme", "globex", "initech"]
    assert manifest["lineage"]["federation"]["rounds"] == 2 and manifest["method"] == "lora"
    out = capsys.readouterr().out
    assert "local-only vs federated vs centralised" in out and "validation loss per silo" in out


@pytest.mark.integration
def test_networked_silo_trains_a_round_with_ray_train_and_the_federated_hooks(tmp_path: Path, shared_ray):
    # Prepare: the networked silo's default trainer, Ray Train (one worker, built by train.launcher.make_trainer),
    # with FFA-LoRA's frozen A and FedProx's proximal gradient applied inside the worker.
    cfg = _cfg(tmp_path)
    cfg.scaling.num_workers = 1
    tensors, config = initial_adapter(cfg, seed=0)
    task = {"round": 1, "adapter_config": config, "local_steps": 2, "local_epochs": None, "proximal_mu": 0.1,
            "freeze_lora_a": True, "secagg": None}
    worker = SiloWorker("acme", cfg, str(DATA / "acme.jsonl"), 0.1, tmp_path / "silo", threads=1, trainer="ray")
    # Execute
    out = worker.train(task, pack_tensors(tensors, {"adapter_config": config}))
    # Assert: the update covers every key, A stayed frozen in the worker, B moved; Ray's storage is cleaned up.
    update, meta = unpack_tensors(out["update"])
    assert set(update) == set(tensors) and meta["num_examples"] == worker.num_examples
    assert isinstance(meta["metrics"]["train_loss"], float)
    assert all(torch.equal(update[k], tensors[k]) for k in tensors if ".lora_A." in k)
    assert all(not torch.equal(update[k], tensors[k]) for k in tensors if ".lora_B." in k)
    assert not (tmp_path / "silo" / "ray" / "acme-round_000001").exists()


@pytest.mark.integration
def test_silo_needing_an_unadvertised_resource_fails_fast(tmp_path: Path, shared_ray):
    # Prepare
    cfg = _cfg(tmp_path)
    cfg.federated["silos"][1]["resources"] = {"silo:globex": 1}
    # Execute / Assert
    with pytest.raises(FederationError, match="silo 'globex' needs silo:globex"):
        run_simulation(cfg, progress=False)
