"""The typed run config: one tree of pydantic models, YAML on disk, `key=value` overrides on top.

Every section forbids unknown keys, so a typo (`train.lrr`) is an error that names the key instead of a
silently ignored setting. Validation errors are re-raised as `ConfigError` with dotted key paths. The
sections are defined in `sections.py`; this module puts them together (`RunConfig`), loads and overrides them,
and is where they are imported from.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError, model_validator

from fineray.train.sections import (
    EMBEDDED_MODEL,
    OBJECTIVES,
    ClusterConfig,
    DataConfig,
    DatasetSpec,
    DeepSpeedConfig,
    EvalConfig,
    FastConfig,
    FsdpConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    PreferenceConfig,
    ScalingConfig,
    Section,
    TrainConfig,
    ValidationSplit,
    repeated,
)

__all__ = [
    "EMBEDDED_MODEL",
    "NAME_PREFIXES",
    "OBJECTIVES",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "DatasetSpec",
    "DeepSpeedConfig",
    "EvalConfig",
    "FastConfig",
    "FsdpConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "PreferenceConfig",
    "RunConfig",
    "ScalingConfig",
    "TrainConfig",
    "ValidationSplit",
    "apply_overrides",
    "config_hash",
    "file_fields",
    "format_validation_error",
    "is_uri_or_name",
    "load_config",
    "load_yaml",
    "repeated",
    "section_for",
    "validate_config",
]
class ConfigError(ValueError):
    """A run config that cannot be loaded; the message names the file, key or line."""

class RunConfig(Section):
    """A whole fine-tuning run. Sections are typed; extra top-level sections are owned by components
    (`tune`, `federated`) and validated by them."""

    model: ModelConfig = ModelConfig()
    method: Literal["lora", "dora", "qlora", "full"] = "lora"
    objective: Literal["sft", "dpo", "ipo", "orpo", "simpo", "reward"] = "sft"
    dpo: PreferenceConfig = PreferenceConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    output: OutputConfig = OutputConfig()
    cluster: ClusterConfig = ClusterConfig()
    eval: EvalConfig = EvalConfig()
    tune: dict[str, Any] | None = None
    federated: dict[str, Any] | None = None
    rl: dict[str, Any] | None = None  # GRPO (`fineray rl`), validated by fineray.rl

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.method == "qlora" and self.train.strategy == "deepspeed":
            # bitsandbytes 4-bit params cannot be partitioned by ZeRO-3; ZeRO-2 would need dtype juggling.
            raise ValueError("method=qlora cannot run with train.strategy=deepspeed; use ddp or fsdp")
        if self.dpo.reference == "adapter_disabled" and self.method == "full":
            raise ValueError("dpo.reference=adapter_disabled needs an adapter method (lora, dora, qlora); a full "
                             "fine-tune precomputes its reference (dpo.reference: auto)")
        if self.objective != "sft" and self.data.format not in ("auto", "preference"):
            raise ValueError(f"objective={self.objective} trains on preference pairs: data.format must be auto or "
                             f"preference (got {self.data.format})")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML-safe, default values included)."""
        return self.model_dump(mode="json")


def format_validation_error(err: ValidationError, source: str, what: str = "config",
                            section: str | None = None) -> str:
    """One line per problem, each naming its dotted key (`train.lrr: unknown key`).

    Args:
        err: pydantic's error.
        source: where the config came from (file name), shown in the first line.
        what: what was invalid (`config`, `tune section`, ...), shown in the first line.
        section: the top-level section the model validated (`tune`, `federated`, `rl`): keys are prefixed
            with it, and a rule of the whole section whose message starts with its key (`silos: duplicate
            names`) is reported under that key.
    """
    lines = [f"invalid {what} ({source}):"]
    for e in err.errors():
        loc = [section, *e["loc"]] if section else list(e["loc"])
        extra = e["type"] == "extra_forbidden"
        msg = "unknown key" if extra else e["msg"].removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        whole = section is not None and not e["loc"]
        if whole and sep and re.fullmatch(r"[a-z_]+", head):  # a cross-field rule naming its key
            loc, msg = [section, head], rest
        got = "" if extra or whole else f" (got {reprlib.repr(e['input'])})"
        lines.append(f"  {'.'.join(str(p) for p in loc) or '<root>'}: {msg}{got}")
    return "\n".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, naming the file and line of a syntax error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError(f"broken YAML at {where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _parse_value(raw: str) -> Any:
    # YAML scalars give the natural types: 1e-4 -> float, true -> bool, [q_proj,v_proj] -> list.
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a plain config dict (returns a new dict)."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        node, last = section_for(out, key.strip(), item)
        node[last] = _parse_value(raw)
    return out


def section_for(data: dict[str, Any], dotted_key: str, item: str) -> tuple[dict[str, Any], str]:
    """The (created if missing) section dict that holds `a.b.c` and the last key `c`; errors name `item`."""
    parts = dotted_key.split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = nxt
    return node, parts[-1]


def validate_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a plain dict as a RunConfig, raising ConfigError with dotted key paths."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (or defaults when `path` is None) plus `key=value` overrides.

    Relative paths of local files (`file_fields`) in the file are resolved against the file's folder, so a
    config runs from any cwd; those given as overrides (or found only from the cwd) against the cwd. Either
    way they become absolute, as Ray workers run in other folders.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = load_yaml(path)
        source = str(path)
        _resolve_relative_paths(data, Path(path).resolve().parent)
    data = apply_overrides(data, overrides or [])
    _resolve_relative_paths(data, Path.cwd())
    return validate_config(data, source)


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> None:
    for container, key, _ in file_fields(data):
        p = container[key]
        if not Path(p).expanduser().is_absolute() and (base / p).exists():
            container[key] = str((base / p).resolve())


#: Prefixes of values that name a built-in or hub dataset or model rather than a local file.
NAME_PREFIXES = ("fineray:", "embedded:", "tiny:", "hf:", "dataset:")


def is_uri_or_name(value: str) -> bool:
    """A storage URI (`s3://...`) or a built-in / hub / registry name (`fineray:`, `hf:`, `dataset:`, ...)."""
    return "://" in value or value.startswith(NAME_PREFIXES)


def _section(node: Any, key: str) -> dict[str, Any]:
    value = node.get(key) if isinstance(node, dict) else None
    return value if isinstance(value, dict) else {}


def file_fields(data: dict[str, Any]) -> list[tuple[dict[str, Any], str, str]]:
    """Every field of a plain run config that names a local input file, as (container, key, dotted label).

    The fields: `data.train` (or each `data.train[i].path`), `data.validation`, `eval.data`,
    `eval.general_text`, `train.deepspeed.config_file` and `federated.silos[i].data` / `.validation`, where they hold a path
    (not a URI, a built-in or hub name, or a number). Loading resolves them against the config file's folder;
    job submission ships them. Assigning `container[key]` rewrites the config.
    """
    d = _section(data, "data")
    slots: list[tuple[dict[str, Any], str, str]] = []
    if isinstance(d.get("train"), list):
        slots += [(spec, "path", f"data.train[{i}].path") for i, spec in enumerate(d["train"]) if isinstance(spec, dict)]
    else:
        slots.append((d, "train", "data.train"))
    slots.append((d, "validation", "data.validation"))
    ev = _section(data, "eval")
    slots += [(ev, "data", "eval.data"), (ev, "general_text", "eval.general_text")]
    slots.append((_section(_section(data, "train"), "deepspeed"), "config_file", "train.deepspeed.config_file"))
    silos = _section(data, "federated").get("silos")
    if isinstance(silos, list):
        slots += [(s, key, f"federated.silos[{i}].{key}") for i, s in enumerate(silos) if isinstance(s, dict)
                  for key in ("data", "validation")]
    return [(c, k, label) for c, k, label in slots
            if isinstance(c.get(k), str) and c[k] and not is_uri_or_name(c[k])]


def config_hash(cfg: RunConfig) -> str:
    """Short stable hash of a config (for job metadata and run names)."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
