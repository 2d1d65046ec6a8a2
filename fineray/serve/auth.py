"""API keys: Bearer tokens from a file, the environment or the serve config, each limited to some models.

Keys are kept only as sha256 digests in memory, so a key file may hold digests instead of keys
(`sha256: <hex>`). A key's `adapters` list names adapters (every version), `name@vN` (one version),
rollout names, `base`, or `*`. The key file is re-read when its modification time changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fineray.serve.config import BASE_ALIAS, ApiKeyEntry, ServeConfig
from fineray.serve.protocol import APIError
from fineray.train.config import ConfigError

__all__ = ["ANONYMOUS", "KeyStore", "Principal", "base_allowed", "hash_key", "parse_env_keys"]

log = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    """sha256 hex digest of an API key (what a key file may store instead of the key)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's label, the models it may use (`None` = everything), and `key_id` (the first 16
    hex digits of the key's sha256; empty without keys) that owns its responses in the request log."""

    name: str
    allowed: frozenset[str] | None
    key_id: str = ""

    def allows(self, model: str, adapter_name: str | None = None) -> bool:
        """May this caller use `model` (a requested name), whose adapter name is `adapter_name`?"""
        if self.allowed is None or "*" in self.allowed:
            return True
        return model in self.allowed or (adapter_name is not None and adapter_name in self.allowed)


ANONYMOUS = Principal("anonymous", None)


def parse_env_keys(value: str) -> list[ApiKeyEntry]:
    """`KEY1:adapter-a,adapter-b;KEY2` -> entries (a key without `:` may use every model)."""
    out = []
    for i, item in enumerate(p.strip() for p in value.split(";")):
        if not item:
            continue
        key, sep, models = item.partition(":")
        adapters = [m.strip() for m in models.split(",") if m.strip()] if sep else ["*"]
        try:
            out.append(ApiKeyEntry(key=key.strip(), name=f"env-{i}", adapters=adapters))
        except ValidationError as e:
            raise ConfigError(f"API key #{i} in the environment: {e.errors()[0]['msg']}") from None
    return out


def _read_key_file(path: str) -> list[ApiKeyEntry]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"api_keys_file {path}: {e}") from None
    try:
        data: Any = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"api_keys_file {path}: not valid YAML/JSON ({e})") from None
    entries = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ConfigError(f"api_keys_file {path}: expected `keys: [{{key|sha256, name, adapters}}, ...]`")
    out = []
    for i, e in enumerate(entries):
        try:
            out.append(ApiKeyEntry.model_validate(e))
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise ConfigError(f"api_keys_file {path}: keys[{i}]{'.' + loc if loc else ''}: {first['msg']}") from None
    return out


class KeyStore:
    """Authenticates `Authorization: Bearer <key>` headers against the configured keys."""

    def __init__(self, cfg: ServeConfig, environ: dict[str, str] | None = None):
        self._cfg = cfg
        self._env = os.environ if environ is None else environ
        self._mtime: float | None = None
        self._keys: dict[str, Principal] = {}
        self.reload(cfg, strict=True)

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (without keys every caller is anonymous)."""
        return bool(self._keys)

    def reload(self, cfg: ServeConfig | None = None, strict: bool = False) -> None:
        """Rebuild the key table (from a new config, and the key file if it changed).

        With `strict=False` a broken key file keeps the previous keys (and logs why) instead of raising.
        """
        cfg = cfg or self._cfg
        try:
            entries = list(cfg.keys)
            if cfg.api_keys_env and self._env.get(cfg.api_keys_env):
                entries += parse_env_keys(self._env[cfg.api_keys_env])
            if cfg.api_keys_file:
                entries += _read_key_file(cfg.api_keys_file)
                self._mtime = Path(cfg.api_keys_file).stat().st_mtime
        except ConfigError:
            if strict:
                raise
            log.exception("keeping the previous API keys")
            return
        table = {}
        for i, e in enumerate(entries):
            digest = (e.sha256 or hash_key(e.key or "")).lower()
            table[digest] = Principal(e.name or f"key-{i}", frozenset(e.adapters), digest[:16])
        self._cfg, self._keys = cfg, table

    def maybe_reload(self, cfg: ServeConfig | None = None) -> None:
        """Reload when the config object changed or the key file's mtime moved."""
        path = (cfg or self._cfg).api_keys_file
        try:
            mtime = Path(path).stat().st_mtime if path else None
        except OSError:
            mtime = None
        if (cfg is not None and cfg is not self._cfg) or mtime != self._mtime:
            self.reload(cfg)

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller for an Authorization header; APIError 401 when keys are on and it is missing or wrong."""
        if not self._keys:
            return ANONYMOUS
        if not authorization:
            raise APIError(401, "You didn't provide an API key. Send it in the Authorization header "
                                "(Authorization: Bearer YOUR_KEY).", code="invalid_api_key")
        scheme, _, token = authorization.partition(" ")
        principal = self._keys.get(hash_key(token.strip())) if scheme.lower() == "bearer" else None
        if principal is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return principal


def base_allowed(principal: Principal, base: str) -> bool:
    """Keys name the base model as `base` or by its spec."""
    return principal.allows(BASE_ALIAS) or principal.allows(base)
