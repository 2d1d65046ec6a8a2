"""What a request's `model` names: the base, an adapter version, or a rollout split across versions.

`pick_variant` is the traffic splitter: with a `user` the choice is a hash of (rollout, user), so a user
stays on one variant while the weights stay the same; without one it is a weighted random draw.
`ModelCatalog` resolves names against the registry, caching the listing for `ttl_s` seconds and
re-listing at once (at most every `min_refresh_s`) when a request names an adapter it has not seen, so a
newly registered adapter is servable without a restart.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fineray.serve.auth import Principal, base_allowed
from fineray.serve.config import BASE_ALIAS, RolloutVariant
from fineray.serve.protocol import APIError
from fineray.train.registry import AdapterRegistry, AdapterVersion, RegistryError, parse_ref

__all__ = ["ModelCatalog", "Target", "pick_variant", "same_base", "user_bucket"]


@dataclass(frozen=True)
class Target:
    """A resolved request target.

    Attributes:
        requested: the `model` string of the request.
        ref: `name@vN` of the adapter, or None for the base model.
        name / version: adapter name and version (`base` / 0 for the base model); metric labels.
        rollout: the rollout name when the request went through a traffic split.
    """

    requested: str
    ref: str | None
    name: str
    version: int
    rollout: str | None = None

    @property
    def model_id(self) -> str:
        """Multiplexed model id on the model deployment ("" = base: no adapter, any replica)."""
        return self.ref or ""

    @property
    def label(self) -> str:
        return self.ref or BASE_ALIAS


def user_bucket(rollout: str, user: str) -> float:
    """A stable number in [0, 1) for a (rollout, user) pair."""
    digest = hashlib.sha256(f"{rollout}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_variant(rollout: str, variants: Sequence[RolloutVariant | tuple[str, float]], user: str | None = None,
                 rng: random.Random | None = None) -> str:
    """Choose a variant's adapter ref by weight; sticky per user when `user` is given."""
    pairs = [(v.adapter, v.weight) if isinstance(v, RolloutVariant) else (v[0], float(v[1])) for v in variants]
    pairs = [(a, w) for a, w in pairs if w > 0]
    if not pairs:
        raise ValueError(f"rollout {rollout!r} has no variant with weight > 0")
    total = sum(w for _, w in pairs)
    x = (user_bucket(rollout, user) if user else (rng or random).random()) * total
    for adapter, w in pairs:
        x -= w
        if x < 0:
            return adapter
    return pairs[-1][0]


def same_base(a: str, b: str) -> bool:
    """Whether two base specs name the same model (paths compared after resolving)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


class ModelCatalog:
    """Registry listing with a short TTL, and name resolution with permission checks."""

    def __init__(self, registry: str, base: str, ttl_s: float = 2.0, min_refresh_s: float = 0.2,
                 clock: Callable[[], float] = time.monotonic):
        self.registry = AdapterRegistry(registry)
        self.base = base
        self.ttl_s, self.min_refresh_s, self._clock = ttl_s, min_refresh_s, clock
        self._lock = threading.Lock()
        self._listed_at = -1e18
        self._versions: dict[str, list[AdapterVersion]] = {}

    # ------------------------------------------------------------------ listing
    def adapters(self, force: bool = False) -> dict[str, list[AdapterVersion]]:
        """Servable adapters (manifest base matches ours): name -> versions, oldest first."""
        now = self._clock()
        with self._lock:
            age = now - self._listed_at
            if age > self.ttl_s or (force and age > self.min_refresh_s):
                listing: dict[str, list[AdapterVersion]] = {}
                for v in self.registry.list():
                    if same_base(str(v.manifest.get("base_model", "")), self.base):
                        listing.setdefault(v.name, []).append(v)
                self._versions, self._listed_at = listing, now
            return self._versions

    def _find(self, name: str, version: int | None) -> AdapterVersion | None:
        for force in (False, True):
            versions = self.adapters(force=force).get(name, [])
            hit = versions[-1] if versions and version is None else next(
                (v for v in versions if v.version == version), None)
            if hit is not None:
                return hit
        return None

    def local_path(self, ref: str) -> Path:
        return self.registry.local_path(ref)

    # ------------------------------------------------------------------ resolution
    def resolve(self, model: str, principal: Principal, rollouts: dict[str, list[RolloutVariant]],
                user: str | None = None, rng: random.Random | None = None) -> Target:
        """Resolve a request's `model` (APIError 400 bad name, 403 not allowed, 404 unknown)."""
        if model in (BASE_ALIAS, self.base):
            if not base_allowed(principal, self.base):
                raise _forbidden(model)
            return Target(model, None, BASE_ALIAS, 0)
        if model in rollouts:
            if not principal.allows(model):
                raise _forbidden(model)
            choice = pick_variant(model, rollouts[model], user, rng)
            if choice == BASE_ALIAS:
                return Target(model, None, BASE_ALIAS, 0, rollout=model)
            name, version = parse_ref(choice)
            hit = self._find(name, version)
            if hit is None:
                raise APIError(404, f"rollout `{model}` routes to `{choice}`, which is not in the registry "
                                    "(or was trained for another base model).", code="model_not_found",
                               param="model")
            return Target(model, hit.ref, hit.name, hit.version, rollout=model)
        try:
            name, version = parse_ref(model)
        except RegistryError as e:
            raise APIError(400, f"Invalid 'model': {e}", param="model", code="invalid_value") from None
        if not principal.allows(model, name):
            raise _forbidden(model)
        hit = self._find(name, version)
        if hit is None:
            raise APIError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")
        return Target(model, hit.ref, hit.name, hit.version)

    def list_models(self, principal: Principal, rollouts: dict[str, list[RolloutVariant]]) -> list[dict[str, Any]]:
        """OpenAI model objects the caller may use: the base, every adapter (latest version), rollouts."""
        out = []
        if base_allowed(principal, self.base):
            out.append(_model_obj(self.base, 0, None))
        for name, versions in sorted(self.adapters().items()):
            if principal.allows(name, name):
                latest = versions[-1]
                out.append(_model_obj(name, _created(latest), self.base, latest.ref))
        seen = {m["id"] for m in out}
        for name in sorted(rollouts):
            if name not in seen and principal.allows(name):
                out.append(_model_obj(name, 0, self.base, None))
        return out


def _created(v: AdapterVersion) -> int:
    try:
        return int(time.mktime(time.strptime(v.manifest.get("created", ""), "%Y-%m-%dT%H:%M:%SZ")) - time.timezone)
    except (ValueError, OverflowError):
        return 0


def _model_obj(mid: str, created: int, parent: str | None, root: str | None = None) -> dict[str, Any]:
    return {"id": mid, "object": "model", "created": created, "owned_by": "fineray",
            "root": root or mid, "parent": parent}


def _forbidden(model: str) -> APIError:
    return APIError(403, f"This API key may not use the model `{model}`.", type="permission_error",
                    code="model_not_allowed", param="model")
