"""Federated LoRA fine-tuning: silos train on private data, only (aggregated) adapter updates leave.

Maths (pure, tensors in and out): :mod:`.strategies`, :mod:`.secagg`, :mod:`.shamir`, :mod:`.dp`,
:mod:`.robust`, :mod:`.split`. Orchestration: :mod:`.config` (the typed ``federated:`` section),
:mod:`.federation` (the coordinator's state machine), :mod:`.silo` (a silo's local work with the
foundation's training loop), :mod:`.simulation` (every silo a Ray actor on one cluster),
:mod:`.server` / :mod:`.client` (coordinator and silos over HTTPS, safetensors bodies), :mod:`.report`.

Public entry points (imported lazily so that ``import fineray.federated`` stays light)::

    run_simulation(cfg, *, progress=True) -> FederationResult
    print_federation(result, console=None)
    run_coordinator(cfg, host, port, certfile, keyfile, ca_file, tokens) -> FederationResult | None
    run_silo(coordinator_url, name, data, token, *, ca, cert, key, ...) -> dict
"""

from __future__ import annotations

from fineray.base.lazy import lazy_exports

__all__ = ["FederatedConfig", "FederationResult", "federated_config", "generate_pki", "print_federation",
           "run_coordinator", "run_silo", "run_simulation"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "FederatedConfig": "fineray.federated.config",
    "federated_config": "fineray.federated.config",
    "FederationResult": "fineray.federated.report",
    "print_federation": "fineray.federated.report",
    "run_simulation": "fineray.federated.simulation",
    "run_coordinator": "fineray.federated.server",
    "run_silo": "fineray.federated.client",
    "generate_pki": "fineray.federated.tls",
})
