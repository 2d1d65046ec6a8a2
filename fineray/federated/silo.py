"""One silo's local work: split its data, train a round with the foundation's loop, evaluate, mask.

:class:`SiloWorker` is used three ways: as a Ray actor in the simulation (``ray.remote(SiloWorker)``),
in-process by the networked silo (:func:`fineray.federated.client.run_silo`), and in tests. Local
training always runs :func:`fineray.train.loop.train_loop`:

* ``trainer="local"``: in this process through a :class:`~fineray.train.session.LocalSession` (one
  worker). The simulation uses it: each silo already is a Ray actor, and a Ray Train run per silo and
  round would add ~15 s of fixed cost each.
* ``trainer="ray"``: Ray Train (``TorchTrainer``, ``scaling.num_workers`` DDP workers) on the silo's own
  Ray (a private local one by default, or the organisation's cluster via ``cluster.address``). The
  default of the networked silo.

Both start from the round's global adapter (``model.adapter`` = the adapter folder written for the
round), with three federated hooks applied in the session's ``prepare_model`` (before DDP wrapping and
before the optimiser is built): the folded base residual is added to the frozen base weights; FFA-LoRA
freezes ``A``; FedProx adds ``mu (w - w_global)`` to each trainable parameter's gradient (the gradient of
``mu/2 ||w - w_global||^2``, i.e. the proximal term, without touching the loop). Only the update leaves
the silo: safetensors bytes plus example count and metrics, or a masked vector under secure aggregation.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from fineray.federated import global_model as gm
from fineray.federated._lora import flatten
from fineray.federated.dp import clip_update
from fineray.federated.robust import validate_update
from fineray.federated.secagg import AdvertisedKeys, SecAggClient, SecAggConfig
from fineray.federated.wire import pack_array, pack_tensors, sha256_bytes, unpack_tensors
from fineray.train.config import RunConfig
from fineray.train.session import LocalSession, RaySession

__all__ = ["FedHooks", "SiloWorker", "split_silo_data"]


class FedHooks:
    """Federated changes to the model, applied in ``Session.prepare_model`` (see the module docstring)."""

    def __init__(self, residual_path: str | None = None, proximal_mu: float = 0.0, freeze_lora_a: bool = False):
        self.residual_path, self.proximal_mu, self.freeze_lora_a = residual_path, proximal_mu, freeze_lora_a

    def apply(self, model: torch.nn.Module) -> None:
        """Merges the residual, freezes ``A`` (FFA-LoRA) and registers the proximal gradient hooks."""
        if self.residual_path:
            tensors, _ = unpack_tensors(Path(self.residual_path).read_bytes())
            gm.merge_residual(model, gm.residual_from_tensors(tensors))
        if self.freeze_lora_a:
            for name, p in model.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(False)
        mu = self.proximal_mu
        if mu > 0:
            for p in model.parameters():
                if p.requires_grad:
                    w0 = p.detach().clone()
                    p.register_hook(lambda g, p=p, w0=w0: g + mu * (p.detach() - w0.to(p.device)).to(g.dtype))


class _LocalFedSession(LocalSession):
    def __init__(self, ckpt_root: Path, hooks: FedHooks, device: str = "cpu") -> None:
        super().__init__(ckpt_root, device=device)
        self.hooks = hooks

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.hooks.apply(model)
        return super().prepare_model(model)


class _RayFedSession(RaySession):
    def __init__(self, hooks: FedHooks, board: Any = None) -> None:
        super().__init__(board)
        self.hooks = hooks

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.hooks.apply(model)  # before DDP wraps it: frozen A must not be registered for all-reduce
        return super().prepare_model(model)


def ray_silo_entry(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` of a silo: the foundation's loop with :class:`FedHooks`."""
    from fineray.train.loop import train_loop

    cfg = RunConfig.model_validate(config["run"])
    if cfg.train.threads_per_worker:
        torch.set_num_threads(cfg.train.threads_per_worker)
    train_loop(cfg, _RayFedSession(FedHooks(**config["hooks"])), adapter_path=config["adapter_path"])


def split_silo_data(data: str, validation: str | float | None, out_dir: Path, seed: int) -> tuple[str, str | None]:
    """Train/validation files of a silo; a fraction is held out once, deterministically, into ``out_dir``.

    Records are copied verbatim (JSON lines), so any input format keeps working.
    """
    if not isinstance(validation, float):
        return data, validation
    from fineray.train.data import read_records

    records = [rec for rec, _ in read_records(data)]
    random.Random(seed).shuffle(records)
    n_val = max(1, int(len(records) * validation)) if len(records) > 1 else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = out_dir / "train.jsonl", out_dir / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records[n_val:]))
    val.write_text("".join(json.dumps(r) + "\n" for r in records[:n_val]))
    return str(train), str(val) if n_val else None


class SiloWorker:
    """A silo's local training and evaluation (plain Python; wrap with ``ray.remote`` for an actor).

    Args:
        name: Silo name.
        run_cfg: The federation's run config (dict or :class:`RunConfig`); data paths are replaced.
        data: The silo's training data.
        validation: Validation file, or a fraction held out of ``data``, or None.
        work_dir: Private working folder (splits, round adapters, kept updates).
        threads: torch threads (None: leave torch's default).
        trainer: ``"local"`` (in-process loop) or ``"ray"`` (Ray Train on the silo's own Ray).
        keep_updates: Keep this many rounds' own updates under ``work_dir`` (audit; tests compare them).
    """

    def __init__(self, name: str, run_cfg: RunConfig | dict[str, Any], data: str, validation: str | float | None,
                 work_dir: str | Path, *, threads: int | None = None, trainer: str = "local",
                 keep_updates: int = 2) -> None:
        self.name = name
        self.run_cfg = run_cfg if isinstance(run_cfg, RunConfig) else RunConfig.model_validate(run_cfg)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.trainer, self.keep_updates, self.threads = trainer, keep_updates, threads
        if threads:
            torch.set_num_threads(threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        gm.quiet_hf()
        self.train_path, self.val_path = split_silo_data(data, validation, self.work_dir / "data",
                                                         self.run_cfg.train.seed)
        from fineray.train.data import read_records

        self.num_examples = len(read_records(self.train_path))
        self._cache: dict[tuple[int, str], dict[str, Any]] = {}
        self._secagg: dict[int, SecAggClient] = {}

    def info(self) -> dict[str, Any]:
        """Name, training example count and data files."""
        return {"name": self.name, "num_examples": self.num_examples, "train": self.train_path, "val": self.val_path}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, adapter_blob: bytes, residual_blob: bytes | None = None, data: str | None = None,
                 max_examples: int = 200) -> dict[str, Any]:
        """Token-weighted validation loss of a global adapter on ``data`` (default: this silo's validation set)."""
        path = data or self.val_path
        if path is None:
            return {"loss": None, "tokens": 0}
        return evaluate_adapter(self.run_cfg, adapter_blob, residual_blob, path, max_examples,
                                self.work_dir / "eval")

    # ------------------------------------------------------------------ training
    def train(self, task: dict[str, Any], adapter_blob: bytes, residual_blob: bytes | None = None) -> dict[str, Any]:
        """Trains one round from the global adapter; returns the update (or, under secagg, keeps it).

        Returns:
            ``{"update": bytes | None, "num_examples", "metrics", "self_check": [reasons]}``; ``update`` is
            None under secure aggregation (the ``secagg_*`` steps send it masked) or when the silo's own
            check failed.
        """
        key = (int(task["round"]), sha256_bytes(adapter_blob))
        if key in self._cache:  # reconnect / coordinator restart: same round, same start, same answer
            return self._public(self._cache[key])
        t0 = time.perf_counter()
        rdir = self.work_dir / f"round_{task['round']:06d}"
        global_t, _ = unpack_tensors(adapter_blob)
        final, metrics = self._train_round(task, global_t, residual_blob, rdir)
        final = {k: v.to(global_t[k].dtype) if k in global_t else v for k, v in final.items()}
        metrics["wall_s"] = round(time.perf_counter() - t0, 3)
        entry = {"round": task["round"], "final": final, "global": global_t, "metrics": metrics, "task": task}
        self._cache = {key: entry}  # only the latest round is ever asked again
        self._keep(rdir, final, metrics)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # release GPU memory between rounds
        return self._public(entry)

    def _train_round(self, task: dict[str, Any], global_t: dict[str, torch.Tensor], residual_blob: bytes | None,
                     rdir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Local training from ``global_t`` with the round's hooks: ``(final adapter tensors, metrics)``."""
        adapter_dir = gm.write_adapter_dir(rdir / "global", global_t, task["adapter_config"])
        residual_path = None
        if residual_blob:
            residual_path = rdir / "residual.safetensors"
            residual_path.write_bytes(residual_blob)
        hooks = FedHooks(str(residual_path) if residual_path else None, float(task.get("proximal_mu") or 0.0),
                         bool(task.get("freeze_lora_a")))
        cfg = self._round_config(task)
        return (self._train_ray if self.trainer == "ray" else self._train_local)(cfg, adapter_dir, hooks, rdir)

    def _public(self, entry: dict[str, Any]) -> dict[str, Any]:
        task, final, global_t = entry["task"], entry["final"], entry["global"]
        meta = {"num_examples": self.num_examples, "metrics": entry["metrics"]}
        if not task.get("secagg"):
            return {"update": pack_tensors(final, meta), **meta, "self_check": []}
        reasons = validate_update(final, global_t, max_delta_norm=task.get("max_update_norm"))
        return {"update": None, **meta, "self_check": reasons}

    def _round_config(self, task: dict[str, Any]) -> RunConfig:
        d = self.run_cfg.to_dict()
        steps = task.get("local_steps")
        d["data"].update(train=self.train_path, validation=None)
        d["model"]["adapter"] = None
        d["lora"]["r"] = int(task["adapter_config"]["r"])
        d["train"].update(max_steps=steps, epochs=task.get("local_epochs") or d["train"]["epochs"],
                          eval_every=10**9, checkpoint_every=None, early_stopping_patience=None,
                          log_every=steps or 10**9, seed=self.run_cfg.train.seed + 1000 * int(task["round"]),
                          threads_per_worker=self.threads or d["train"]["threads_per_worker"])
        d["output"]["register_adapter"] = False
        d["federated"] = d["tune"] = None
        return RunConfig.model_validate(d)

    def _train_local(self, cfg: RunConfig, adapter_dir: Path, hooks: FedHooks, rdir: Path
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors.torch import load_file

        from fineray.train.loop import train_loop

        device = "cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"
        session = _LocalFedSession(rdir / "ckpt", hooks, device=device)
        state = train_loop(cfg, session, adapter_path=str(adapter_dir))
        final = load_file(str(session.checkpoints[-1] / "adapter" / "adapter_model.safetensors"))
        shutil.rmtree(rdir / "ckpt", ignore_errors=True)
        return final, _loop_metrics(state.history, session.reports[-1] if session.reports else {})

    def _train_ray(self, cfg: RunConfig, adapter_dir: Path, hooks: FedHooks, rdir: Path
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors.torch import load_file

        from fineray.train.launcher import make_trainer

        storage = self.work_dir / "ray" / f"{self.name}-{rdir.name}"
        trainer = make_trainer(cfg, rdir, adapter_path=str(adapter_dir), storage_path=str(storage),
                               entry=ray_silo_entry, extra_config={"hooks": vars(hooks)})
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"silo {self.name}: local training produced no checkpoint")
        with result.checkpoint.as_directory() as ckpt:
            final = load_file(str(Path(ckpt) / "adapter" / "adapter_model.safetensors"))
            hist = [json.loads(x) for x in (Path(ckpt) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        shutil.rmtree(storage, ignore_errors=True)
        return final, _loop_metrics(hist, dict(result.metrics or {}))

    def _keep(self, rdir: Path, final: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "update.safetensors").write_bytes(pack_tensors(final, {"metrics": metrics}))
        shutil.rmtree(rdir / "global", ignore_errors=True)
        rounds = sorted(p for p in self.work_dir.glob("round_*") if p.is_dir())
        for old in rounds[: -self.keep_updates] if self.keep_updates else rounds:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ secure aggregation
    def secagg_keys(self, round_no: int) -> dict[str, str]:
        """Step 0: this silo's advertised keys for ``round_no`` (the same on every call of a round).

        Raises:
            KeyError: No trained update for ``round_no`` (e.g. the silo restarted): it is a dropout.
        """
        client = self._secagg.get(round_no)
        if client is None:
            sa = self._entry(round_no)["task"]["secagg"]
            client = SecAggClient(int(sa["id"]), SecAggConfig(**sa["config"]), round_id=round_no)
            self._secagg = {round_no: client}  # only the latest round's protocol state is kept
        return client.keys.to_json()

    def secagg_share(self, task: dict[str, Any]) -> dict[str, str]:
        """Step 1: ``{peer id: hex ciphertext}`` of this silo's key shares (task from the coordinator)."""
        keyset = {int(i): AdvertisedKeys.from_json(k) for i, k in task["keyset"].items()}
        out = self._secagg_client(task["round"]).share(keyset, int(task["threshold"]))
        return {str(v): ct.hex() for v, ct in out.items()}

    def secagg_mask(self, task: dict[str, Any]) -> bytes:
        """Step 2: the masked encoding of this silo's delta (safetensors), from the shares addressed to it.

        Raises:
            KeyError: No trained update or protocol state for the round (the silo restarted).
            SecAggError: Too few silos shared, or a share does not decrypt.
        """
        round_no = int(task["round"])
        client = self._secagg_client(round_no)
        entry = self._entry(round_no)
        train_task, final, global_t = entry["task"], entry["final"], entry["global"]
        delta = {k: final[k].to(torch.float64) - global_t[k].to(torch.float64) for k in train_task["trainable_keys"]}
        weight = 1.0 if train_task.get("uniform_weight") else float(self.num_examples)
        if train_task.get("dp_clip"):
            delta, _ = clip_update(delta, float(train_task["dp_clip"]))
        vec, _ = flatten(delta)
        inbox = {int(u): bytes.fromhex(ct) for u, ct in task["shares"].items()}
        return pack_array(client.mask(vec, weight, inbox), {"round": round_no})

    def secagg_reveal(self, task: dict[str, Any]) -> dict[str, Any]:
        """Step 3: shares of the survivors' seeds and of the dropped silos' mask keys (never both for one)."""
        return self._secagg_client(task["round"]).reveal(task["survivors"], task["dropped"]).to_json()

    def _entry(self, round_no: int) -> dict[str, Any]:
        entry = next((e for (r, _), e in self._cache.items() if r == round_no), None)
        if entry is None:
            raise KeyError(f"silo {self.name}: no trained update for round {round_no}")
        return entry

    def _secagg_client(self, round_no: int) -> SecAggClient:
        client = self._secagg.get(int(round_no))
        if client is None:
            raise KeyError(f"silo {self.name}: no secure-aggregation state for round {round_no} (restarted?)")
        return client


def _loop_metrics(history: list[dict[str, Any]], last: dict[str, Any]) -> dict[str, Any]:
    losses = [r["train_loss"] for r in history if isinstance(r.get("train_loss"), float)]
    tail = losses[-max(1, len(losses) // 4):] if losses else []
    return {"train_loss": sum(tail) / len(tail) if tail else None,
            "train_loss_first": losses[0] if losses else None, "steps": len(history),
            "stop_reason": last.get("stop_reason")}


def evaluate_adapter(run_cfg: RunConfig, adapter_blob: bytes, residual_blob: bytes | None, data: str,
                     max_examples: int, scratch: Path) -> dict[str, Any]:
    """Loss of ``base (+ residual) + adapter`` on the first ``max_examples`` records of ``data``."""
    from fineray.train.data import load_examples
    from fineray.train.evaluate import nll

    tensors, meta = unpack_tensors(adapter_blob)
    config = meta.get("adapter_config")
    if not config:
        raise ValueError("adapter body lacks its adapter_config metadata")
    folder = gm.write_adapter_dir(scratch / "adapter", tensors, config)
    residual = gm.residual_from_tensors(unpack_tensors(residual_blob)[0]) if residual_blob else None
    tok, model = gm.load_adapter_model(run_cfg, folder, residual)
    d = run_cfg.data
    examples = load_examples(data, d.format, d.on_error, d.system_prompt)[:max_examples]
    total, tokens = nll(model, tok, examples, d.max_seq_len, batch_size=run_cfg.train.batch_size * 2)
    del model
    gc.collect()
    return {"loss": total / tokens if tokens else None, "tokens": tokens,
            "ppl": math.exp(min(total / tokens, 50)) if tokens else None}
