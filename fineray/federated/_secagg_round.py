"""The coordinator's side of one round of secure aggregation with dropout recovery (:mod:`.secagg`).

After training, the round goes through the protocol's steps as phases::

    keys (sent with the training answer) -> share -> mask -> unmask -> done

:class:`SecAggRound` holds what arrived in each phase and what each silo must do next (:meth:`~SecAggRound.task`,
JSON-able, the same for the HTTPS silos and the simulation's actors). A phase ends when every silo it
expects has answered or at its deadline (the caller's clock); :meth:`~SecAggRound.advance` then freezes who
is still in (the key set ``U1``, the sharers ``U2``, the survivors ``U3``) or says why the round fails:
fewer silos than the threshold at any step. Shares are relayed as the ciphertexts the silos made; the
coordinator never sees a share in the clear until a survivor reveals it in the last phase.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from fineray.federated.secagg import (
    AdvertisedKeys,
    Reveal,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    resolve_threshold,
)
from fineray.federated.wire import SubmitError, WireError, unpack_array

__all__ = ["SecAggRound"]

_NEXT = {"keys": "share", "share": "mask", "mask": "unmask", "unmask": "done"}
_T = TypeVar("_T")


def _parse(parse: Callable[[Any], _T], body: Any) -> _T:
    """``parse(body)``; a malformed body is a 400."""
    try:
        return parse(body)
    except (SecAggError, WireError, ValueError, TypeError, AttributeError) as e:
        raise SubmitError(400, f"malformed body: {e}") from None


@dataclass
class SecAggRound:
    """Secure-aggregation state of the open round (not checkpointed: a restarted coordinator re-opens the round).

    Attributes:
        silo_ids: ``{silo name: secagg id}`` of the federation.
        config: The fixed-point parameters of every silo.
        vector_size: Words in a masked vector (the flattened trainable delta plus the weight).
        threshold_spec: ``federated.secure_aggregation.threshold`` (see :func:`~.secagg.resolve_threshold`).
        phase: ``keys`` | ``share`` | ``mask`` | ``unmask`` | ``done``.
        keys: Advertised keys by silo, and ``meta`` their example counts and metrics.
        keyset: ``U1``, frozen after the keys phase; ``threshold`` is resolved then.
        shares: ``{sender: {recipient id: ciphertext}}``; ``sharers`` is ``U2``.
        masked: Masked vectors by silo; ``survivors`` is ``U3``.
        reveals: The survivors' revealed shares.
    """

    silo_ids: dict[str, int]
    config: SecAggConfig
    vector_size: int
    threshold_spec: int | float | None = None
    phase: str = "keys"
    keys: dict[str, AdvertisedKeys] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    keyset: list[str] = field(default_factory=list)
    threshold: int = 0
    shares: dict[str, dict[int, bytes]] = field(default_factory=dict)
    sharers: list[str] = field(default_factory=list)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    survivors: list[str] = field(default_factory=list)
    reveals: dict[str, Reveal] = field(default_factory=dict)

    # ------------------------------------------------------------------ what each silo does next
    def pending(self) -> list[str]:
        """Silos the current phase still waits for (empty in ``keys``: the training answers decide that)."""
        expected, have = self._phases().get(self.phase, ([], {}))
        return [s for s in expected or [] if s not in have]

    def _phases(self) -> dict[str, tuple[list[str] | None, dict[str, Any]]]:
        """``{phase: (silos it expects or None for any participant, what arrived)}``."""
        return {"keys": (None, self.keys), "share": (self.keyset, self.shares), "mask": (self.sharers, self.masked),
                "unmask": (self.survivors, self.reveals)}

    def task(self, silo: str) -> dict[str, Any] | None:
        """``silo``'s step in this phase (JSON-able), or None when it has nothing to do."""
        if silo not in self.pending():
            return None
        ids = self.silo_ids
        if self.phase == "share":
            return {"status": "share", "threshold": self.threshold,
                    "keyset": {str(ids[s]): self.keys[s].to_json() for s in self.keyset}}
        if self.phase == "mask":
            me = ids[silo]
            return {"status": "mask", "shares": {str(ids[u]): self.shares[u][me].hex() for u in self.sharers
                                                 if u != silo}}
        return {"status": "unmask", "survivors": sorted(ids[s] for s in self.survivors),
                "dropped": sorted(ids[s] for s in self.sharers if s not in self.survivors)}

    # ------------------------------------------------------------------ submissions (bodies as they arrive)
    def add_keys(self, silo: str, keys: dict[str, Any], num_examples: int, metrics: dict[str, Any]) -> str:
        if self.seen("keys", silo):
            return "duplicate"
        self.keys[silo] = _parse(AdvertisedKeys.from_json, keys)
        self.meta[silo] = {"num_examples": int(num_examples), "metrics": dict(metrics)}
        return "accepted"

    def add_shares(self, silo: str, shares: dict[str, str]) -> str:
        if self.seen("share", silo):
            return "duplicate"
        parsed = _parse(lambda d: {int(v): bytes.fromhex(ct) for v, ct in d.items()}, shares)
        want = {self.silo_ids[s] for s in self.keyset if s != silo}
        if set(parsed) != want:
            raise SubmitError(400, f"shares must be addressed to exactly the silos {sorted(want)} of the key set")
        self.shares[silo] = parsed
        return "accepted"

    def add_masked(self, silo: str, blob: bytes) -> str:
        if self.seen("mask", silo):
            return "duplicate"
        vector, _ = _parse(unpack_array, blob)
        if vector.shape != (self.vector_size,) or vector.dtype != self.config.dtype:
            raise SubmitError(400, f"a masked vector is {self.vector_size} words of {self.config.dtype}, not "
                                   f"{vector.shape} {vector.dtype}")
        self.masked[silo] = vector
        return "accepted"

    def add_reveal(self, silo: str, reveal: dict[str, Any]) -> str:
        if self.seen("unmask", silo):
            return "duplicate"
        parsed = _parse(Reveal.from_json, reveal)
        ids = self.silo_ids
        dropped = {ids[s] for s in self.sharers if s not in self.survivors}
        if set(parsed.seeds) != {ids[s] for s in self.survivors} or set(parsed.mask_keys) != dropped:
            raise SubmitError(400, "a reveal must hold one seed share per survivor and one mask-key share per "
                                   "dropped silo, nothing else")
        self.reveals[silo] = parsed
        return "accepted"

    def seen(self, phase: str, silo: str) -> bool:
        """Checks that ``phase`` is current and expects ``silo``; True if it already answered (``duplicate``).

        Raises:
            SubmitError: 409, another phase or a silo this phase does not expect.
        """
        expected, have = self._phases()[phase]
        if self.phase != phase:
            raise SubmitError(409, f"secure aggregation is in phase {self.phase!r}, not {phase!r}")
        if expected is not None and silo not in expected:
            raise SubmitError(409, f"silo {silo!r} is not expected in the {phase} phase of this round")
        return silo in have

    # ------------------------------------------------------------------ phases
    def advance(self) -> str | None:
        """Closes the current phase with whoever answered; returns why the round fails, or None.

        The round fails when fewer than two silos sent keys, or fewer than the threshold shared, masked
        or revealed: then the dropped silos' masks cannot be removed (or the sum would be one silo's).
        """
        t = self.threshold
        if self.phase == "keys":
            self.keyset = sorted(self.keys)
            n = len(self.keyset)
            self.threshold = t = resolve_threshold(self.threshold_spec, n)
            if n < 2 or t > n:
                return f"only {n} silos sent keys, fewer than the threshold {max(t, 2)}"
        elif self.phase == "share":
            self.sharers = sorted(self.shares)
            if len(self.sharers) < t:
                return (f"only {len(self.sharers)} of {len(self.keyset)} silos shared their keys, fewer than the "
                        f"threshold {t}")
        elif self.phase == "mask":
            self.survivors = sorted(self.masked)
            if len(self.survivors) < t:
                return (f"only {len(self.survivors)} of {len(self.sharers)} silos delivered masked vectors, fewer "
                        f"than the threshold {t}: the dropped silos' masks cannot be removed")
        elif self.phase == "unmask" and len(self.reveals) < t:
            return f"only {len(self.reveals)} survivors revealed their shares, fewer than the threshold {t}"
        self.phase = _NEXT[self.phase]
        return None

    @property
    def dropped(self) -> list[str]:
        """Silos of the key set whose masked vector never arrived (their masks were removed, or never added)."""
        return [s for s in self.keyset if s not in self.masked]

    def decode(self, round_id: int) -> tuple[torch.Tensor, float]:
        """``(sum of the survivors' weighted clipped updates, their total weight)`` (see :class:`SecAggServer`)."""
        ids = self.silo_ids
        server = SecAggServer({ids[s]: self.keys[s] for s in self.keyset}, self.config, self.threshold,
                              round_id=round_id)
        return server.unmask({ids[s]: v for s, v in self.masked.items()}, [ids[s] for s in self.sharers],
                             {ids[s]: r for s, r in self.reveals.items()})
