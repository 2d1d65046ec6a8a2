"""Offline validation of Kubernetes manifests: `validate_manifest(obj)` lists `path: problem` strings.

RayCluster / RayJob / RayService are checked against the KubeRay v1.7.0 CRD schemas (see `_k8s_schema`)
plus the name and spec rules the KubeRay operator enforces itself; ConfigMap / Secret /
PersistentVolumeClaim / ServiceAccount / Namespace against small strict hand-written schemas. When the
optional `kubernetes-validate` package is installed, core kinds are also checked against its bundled
(offline) Kubernetes schemas, which covers every other built-in kind too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import ValidationError

from fineray.cluster._k8s_names import (
    DNS1035_LABEL,
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    LABEL_VALUE,
    MAX_NAME_LEN,
    QUANTITY,
)
from fineray.cluster._k8s_schema import (
    CORE_SCHEMAS,
    CRD_FILES,
    OBJECT_META,
    crd_dir,
    crd_schema,
    schema_validator,
)

__all__ = ["validate_manifest"]


_PATTERN_NAMES = {
    QUANTITY: "a Kubernetes quantity (e.g. 4, '500m', '16Gi')",
    DNS1123_SUBDOMAIN: "a valid name (DNS-1123 subdomain: lowercase letters, digits, '-' and '.')",
    DNS1123_LABEL.pattern: "a valid DNS-1123 label (lowercase letters, digits and '-')",
    LABEL_VALUE: "a valid label value (at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends)",
}


def _fmt_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or "<root>"


def _join(path: str, name: str) -> str:
    return name if path == "<root>" else f"{path}.{name}"


def _format_error(err: ValidationError) -> list[str]:
    path = _fmt_path(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = set(err.schema.get("properties") or {})
        patterns = list(err.schema.get("patternProperties") or {})
        return [
            f"{_join(path, str(extra))}: unknown field"
            for extra in sorted(err.instance)
            if extra not in known and not any(re.search(p, str(extra)) for p in patterns)
        ]
    if err.validator == "required" and isinstance(err.instance, dict):
        return [
            f"{_join(path, r)}: required field is missing"
            for r in err.validator_value
            if r not in err.instance
        ]
    if err.validator == "anyOf" and err.schema is OBJECT_META:
        return [f"{_join(path, 'name')}: required field is missing"]
    if err.validator == "propertyNames" or "propertyNames" in err.schema_path:
        return [f"{path}: invalid key {err.instance!r}"]
    if err.validator == "pattern":
        what = _PATTERN_NAMES.get(err.validator_value)
        if what:
            return [f"{path}: {err.instance!r} is not {what}"]
        return [f"{path}: {err.instance!r} does not match {err.validator_value!r}"]
    return [f"{path}: {err.message}"]


def _schema_errors(validator: Any, obj: Mapping[str, Any]) -> list[str]:
    return [msg for err in validator.iter_errors(obj) for msg in _format_error(err)]


def _name_rules(obj: Mapping[str, Any]) -> list[str]:
    kind = obj.get("kind")
    name = (obj.get("metadata") or {}).get("name") if isinstance(obj.get("metadata"), Mapping) else None
    if not isinstance(name, str) or kind not in MAX_NAME_LEN:
        return []
    msgs = []
    if len(name) > MAX_NAME_LEN[kind]:
        msgs.append(
            f"metadata.name: {kind} names must be at most {MAX_NAME_LEN[kind]} characters, got {len(name)}"
        )
    if not DNS1035_LABEL.match(name):
        msgs.append(
            f"metadata.name: {name!r} is not a DNS-1035 label (lowercase letters, digits and '-', starting with a "
            "letter and ending with a letter or digit)"
        )
    return msgs


def _version_tuple(v: str) -> tuple[int, ...] | None:
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", v)
    return tuple(int(x or 0) for x in m.groups()) if m else None


def _cluster_rules(spec: Any, path: str) -> list[str]:
    """The RayCluster spec checks of the KubeRay operator (ValidateRayClusterSpec) that a schema cannot express."""
    if not isinstance(spec, Mapping):
        return []
    msgs: list[str] = []
    resource_params = ("num-cpus", "num-gpus", "memory", "resources")

    def containers(group: Any) -> Any:
        try:
            return group["template"]["spec"]["containers"]
        except (KeyError, TypeError):
            return None

    def group_rules(group: Any, gpath: str, label: str) -> None:
        if not isinstance(group, Mapping):
            return
        if not containers(group):
            msgs.append(f"{gpath}.template.spec.containers: the {label} needs at least one container")
        params = group.get("rayStartParams") or {}
        if isinstance(params, Mapping):
            if "labels" in params:
                msgs.append(f"{gpath}.rayStartParams.labels: not supported; use {gpath}.labels")
            if group.get("resources") and any(params.get(p) for p in resource_params):
                msgs.append(
                    f"{gpath}.resources: set Ray resources either here or in rayStartParams "
                    f"({', '.join(resource_params)}), not both"
                )

    group_rules(spec.get("headGroupSpec"), f"{path}.headGroupSpec", "head group")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    names: dict[str, int] = {}
    workers = spec.get("workerGroupSpecs") or []
    for i, group in enumerate(workers if isinstance(workers, list) else []):
        gpath = f"{path}.workerGroupSpecs[{i}]"
        if not isinstance(group, Mapping):
            continue
        group_rules(group, gpath, "worker group")
        lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            msgs.append(f"{gpath}: minReplicas and maxReplicas are required when autoscaling is off")
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi))
        if ints and lo > hi:
            msgs.append(f"{gpath}.minReplicas: {lo} is greater than maxReplicas {hi}")
        for field, value in (("minReplicas", lo), ("maxReplicas", hi), ("replicas", n)):
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                msgs.append(f"{gpath}.{field}: must not be negative, got {value}")
        gname = group.get("groupName")
        if isinstance(gname, str):
            if gname in names:
                msgs.append(
                    f"{gpath}.groupName: {gname!r} is already used by workerGroupSpecs[{names[gname]}]"
                )
            names.setdefault(gname, i)
    auth = spec.get("authOptions")
    if isinstance(auth, Mapping) and auth.get("mode") == "token":
        version = _version_tuple(str(spec.get("rayVersion") or ""))
        if version is None:
            msgs.append(f"{path}.rayVersion: token auth (authOptions.mode: token) needs rayVersion >= 2.52.0")
        elif version < (2, 52, 0):
            msgs.append(f"{path}.rayVersion: token auth needs Ray >= 2.52.0, got {spec.get('rayVersion')}")
    elif isinstance(auth, Mapping) and auth.get("enableK8sTokenAuth"):
        msgs.append(f"{path}.authOptions.enableK8sTokenAuth: needs authOptions.mode: token")
    return msgs


def _ray_rules(obj: Mapping[str, Any]) -> list[str]:
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return []
    kind = obj["kind"]
    msgs: list[str] = []
    if kind == "RayCluster":
        msgs += _cluster_rules(spec, "spec")
    elif kind == "RayJob":
        ttl = spec.get("ttlSecondsAfterFinished")
        if isinstance(ttl, int) and ttl > 0 and not spec.get("shutdownAfterJobFinishes"):
            msgs.append("spec.ttlSecondsAfterFinished: needs spec.shutdownAfterJobFinishes: true")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            msgs.append(
                "spec.suspend: a RayJob can be suspended only with spec.shutdownAfterJobFinishes: true"
            )
        if spec.get("rayClusterSpec") is None and not spec.get("clusterSelector"):
            msgs.append("spec.rayClusterSpec: one of spec.rayClusterSpec or spec.clusterSelector must be set")
        for field, minimum in (
            ("ttlSecondsAfterFinished", 0),
            ("backoffLimit", 0),
            ("activeDeadlineSeconds", 1),
        ):
            value = spec.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value < minimum:
                msgs.append(f"spec.{field}: must be >= {minimum}, got {value}")
        if isinstance(spec.get("runtimeEnvYAML"), str):
            try:
                yaml.safe_load(spec["runtimeEnvYAML"])
            except yaml.YAMLError as e:
                msgs.append(f"spec.runtimeEnvYAML: not valid YAML ({e})")
        msgs += _cluster_rules(spec.get("rayClusterSpec"), "spec.rayClusterSpec")
    elif kind == "RayService":
        strategy = spec.get("upgradeStrategy")
        allowed = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
        if (
            isinstance(strategy, Mapping)
            and strategy.get("type") is not None
            and strategy["type"] not in allowed
        ):
            msgs.append(f"spec.upgradeStrategy.type: {strategy['type']!r} is not one of {', '.join(allowed)}")
        serve = spec.get("serveConfigV2")
        if isinstance(serve, str):
            try:
                parsed = yaml.safe_load(serve)
            except yaml.YAMLError as e:
                msgs.append(f"spec.serveConfigV2: not valid YAML ({e})")
            else:
                if not isinstance(parsed, Mapping):
                    msgs.append(
                        "spec.serveConfigV2: must be a YAML mapping (Serve config with `applications`)"
                    )
                elif not isinstance(parsed.get("applications"), list) or not parsed["applications"]:
                    msgs.append("spec.serveConfigV2.applications: must be a non-empty list")
                else:
                    for i, app in enumerate(parsed["applications"]):
                        if not isinstance(app, Mapping) or not app.get("import_path"):
                            msgs.append(f"spec.serveConfigV2.applications[{i}].import_path: required")
        msgs += _cluster_rules(spec.get("rayClusterConfig"), "spec.rayClusterConfig")
    return msgs


def _kubernetes_validate_errors(obj: Mapping[str, Any], kube_version: str | None) -> list[str] | None:
    """Errors from the optional `kubernetes-validate` package (None when it is not installed or has no schema)."""
    try:
        import kubernetes_validate  # type: ignore[import-not-found]
        from kubernetes_validate import utils as kv_utils  # type: ignore[import-not-found]
    except ImportError:
        return None
    skip = tuple(
        getattr(kv_utils, n)
        for n in ("SchemaNotFoundError", "InvalidSchemaError", "VersionNotSupportedError")
        if isinstance(getattr(kv_utils, n, None), type)
    )
    version = kube_version or kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(dict(obj), version, strict=True)
    except kv_utils.ValidationError as e:
        return _format_error(e) or [f"{_fmt_path(e.path)}: {e.message}"]
    except skip:  # no schema for this kind, or an unsupported Kubernetes version
        return None
    return []


def validate_manifest(
    obj: dict,
    *,
    crds: str | Path | None = None,
    kube_version: str | None = None,
) -> list[str]:
    """Problems with one Kubernetes object, each `path.to.field: what is wrong`; an empty list means valid.

    `ray.io/v1` RayCluster, RayJob and RayService are checked against the KubeRay v1.7.0 CRD schemas (from `crds`,
    default: the copy in the package) and the KubeRay operator's own rules (name length and DNS-1035 form,
    minReplicas <= maxReplicas, token auth needs Ray >= 2.52, ...). ConfigMap, Secret, PersistentVolumeClaim,
    ServiceAccount and Namespace are checked against strict built-in schemas, and, when `kubernetes-validate` is
    installed, against its Kubernetes schemas (`kube_version`, default its latest) too. Other kinds are reported
    as unsupported unless `kubernetes-validate` knows them.
    """
    if not isinstance(obj, Mapping):
        return [f"<root>: a manifest must be a mapping, got {type(obj).__name__}"]
    kind, api_version = obj.get("kind"), obj.get("apiVersion")
    if not isinstance(kind, str) or not kind:
        return ["kind: required field is missing"]
    if not isinstance(api_version, str) or not api_version:
        return ["apiVersion: required field is missing"]

    if api_version.startswith("ray.io/"):
        if kind not in CRD_FILES:
            return [f"kind: {kind!r} is not a KubeRay kind ({', '.join(CRD_FILES)})"]
        expected, schema = crd_schema(kind, str(Path(crds) if crds is not None else crd_dir()))
        if api_version != expected:
            return [f"apiVersion: {api_version!r} is not supported for {kind}; use {expected!r}"]
        msgs = _schema_errors(schema_validator(schema), obj)
        if not any(m.startswith("metadata.name:") for m in msgs):
            msgs += _name_rules(obj)
        if not msgs:
            msgs += _ray_rules(obj)
        return _dedupe(msgs)

    msgs: list[str] = []
    schema = CORE_SCHEMAS.get(kind) if api_version == "v1" else None
    if schema is not None:
        msgs += _schema_errors(schema_validator(schema), obj)
        if msgs:  # kubernetes-validate reports only its first error, most likely one of these
            return _dedupe(msgs)
    extra = _kubernetes_validate_errors(obj, kube_version)
    if extra is not None:
        msgs += extra
    elif schema is None:
        return [
            (
                f"kind: no schema for {api_version} {kind} (built in: v1 {', '.join(sorted(CORE_SCHEMAS))}, and "
                "ray.io/v1 RayCluster, RayJob, RayService; install kubernetes-validate for other kinds)"
            )
        ]
    return _dedupe(msgs)


def _dedupe(msgs: list[str]) -> list[str]:
    return list(dict.fromkeys(msgs))
