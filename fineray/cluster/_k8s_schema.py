"""JSON Schemas for Kubernetes objects: the KubeRay CRDs read the way the API server reads them, and small
strict schemas for the core kinds fineray ships (ConfigMap, Secret, PersistentVolumeClaim, ServiceAccount,
Namespace).

The CRD schemas (OpenAPI v3 structural schemas, from the KubeRay v1.7.0 CRDs in `fineray/cluster/_crds/`) are
converted to JSON Schema with the API server's semantics: unknown fields are errors (as with
`kubectl apply --validate=strict`, the default), `x-kubernetes-int-or-string` fields take an integer or a string,
`nullable` allows null, `x-kubernetes-preserve-unknown-fields` allows any field, required fields that carry a
`default` may be omitted (the API server fills them in), `x-kubernetes-list-type: map|set` lists reject duplicate
keys, and `int32`/`int64` formats are range-checked. CEL rules (`x-kubernetes-validations`) are not evaluated, except
the simple `self in [...]` form.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator, FormatChecker, ValidationError, validators

from fineray.cluster._k8s_names import DNS1123_LABEL, DNS1123_SUBDOMAIN, LABEL_KEY, LABEL_VALUE, QUANTITY
from fineray.cluster._k8s_yaml import yaml_loader

__all__ = ["CORE_SCHEMAS", "CRD_FILES", "OBJECT_META", "crd_dir", "crd_schema", "schema_validator"]

CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}


# --------------------------------------------------------------------------------------------------------------------
# CRD schemas -> JSON Schema


def crd_dir() -> Path:
    """Folder holding the KubeRay CRDs: the copy shipped in the package (`fineray/cluster/_crds`), or in a source
    checkout whose package copy is missing, `tests/data/kuberay-crds`."""
    here = Path(__file__).resolve().parent
    packaged = here / "_crds"
    if (packaged / CRD_FILES["RayCluster"]).is_file():
        return packaged
    checkout = here.parents[1] / "tests" / "data" / "kuberay-crds"
    return checkout if (checkout / CRD_FILES["RayCluster"]).is_file() else packaged


def _convert(node: Any) -> Any:
    """An OpenAPI v3 structural-schema node (as in a CRD) as a JSON Schema (Draft 7) node with k8s semantics."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in ("items", "not"):
            out[key] = _convert(value)
        elif key == "additionalProperties":
            out[key] = _convert(value) if isinstance(value, dict) else value
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_convert(sub) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        # controller-gen spells it anyOf [integer, string]; the keyword below gives a clearer message.
        out.pop("anyOf", None)
    if node.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    if "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False  # strict field validation, like `kubectl apply --validate=strict`
    if "required" in node:
        props = node.get("properties") or {}
        # The API server applies defaults before validating, so a required field with a default may be omitted.
        required = [r for r in node["required"] if "default" not in (props.get(r) or {})]
        if required:
            out["required"] = required
        else:
            out.pop("required")
    return out


def _int_or_string(
    validator: Any, value: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if value and (isinstance(instance, bool) or not isinstance(instance, (int, str))):
        yield ValidationError(f"{instance!r} must be an integer or a string (int-or-string field)")


def _list_type(
    validator: Any, value: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if not isinstance(instance, list):
        return
    if value == "set":
        seen: list[Any] = []
        for item in instance:
            if item in seen:
                yield ValidationError(f"duplicate entry {item!r} in a list of unique values")
            seen.append(item)
    elif value == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        props = (schema.get("items") or {}).get("properties") or {}
        seen_keys: dict[tuple, int] = {}
        for i, item in enumerate(instance):
            if not isinstance(item, dict):
                continue
            key = tuple(item.get(k, (props.get(k) or {}).get("default")) for k in keys)
            if key in seen_keys:
                shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key))
                yield ValidationError(
                    f"duplicate entry ({shown}) at index {i}, first at index {seen_keys[key]}"
                )
            else:
                seen_keys[key] = i


_CEL_IN_LIST = re.compile(r"^\s*self\s+in\s+(\[.*\])\s*$", re.DOTALL)


def _cel_rules(
    validator: Any, rules: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    # Only the `self in [...]` form is evaluated; transition rules (oldSelf) and richer CEL are left to the server.
    for rule in rules or []:
        m = _CEL_IN_LIST.match(str(rule.get("rule", "")))
        if not m:
            continue
        try:
            allowed = json.loads(m.group(1).replace("'", '"'))
        except ValueError:
            continue
        if instance not in allowed:
            yield ValidationError(rule.get("message") or f"{instance!r} is not one of {allowed}")


_format_checker = FormatChecker(formats=())


@_format_checker.checks("int32")
def _is_int32(value: Any) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**31) <= value < 2**31


@_format_checker.checks("int64")
def _is_int64(value: Any) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**63) <= value < 2**63


_K8sValidator = validators.extend(
    Draft7Validator,
    {
        "x-kubernetes-int-or-string": _int_or_string,
        "x-kubernetes-list-type": _list_type,
        "x-kubernetes-validations": _cel_rules,
    },
)

OBJECT_META: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS1123_LABEL.pattern},
        "labels": {
            "type": "object",
            "propertyNames": {"maxLength": 316, "pattern": LABEL_KEY},
            "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE},
        },
        "annotations": {
            "type": "object",
            "propertyNames": {"pattern": LABEL_KEY},
            "additionalProperties": {"type": "string"},
        },
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": ["string", "null"]},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array"},
        "selfLink": {"type": "string"},
    },
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
    "additionalProperties": False,
}


def _crd_v1(text: str) -> tuple[str, dict[str, Any]]:
    """(group, the `v1` entry of spec.versions) of a CRD.

    The CRD files hold every served version (v1 and the deprecated v1alpha1, each about half of the file), so only
    the v1 entry of controller-gen's layout (`  versions:` followed by `  - ` items) is parsed; any other layout
    falls back to reading the whole document.
    """
    group = re.search(r"^  group: (\S+)$", text, re.MULTILINE)
    starts = [m.start() for m in re.finditer(r"^  - ", text, re.MULTILINE)]
    versions_at = text.find("\n  versions:\n")
    if group and versions_at >= 0:
        items = [i for i in starts if i > versions_at]
        for begin, end in zip(items, [*items[1:], len(text)]):
            chunk = text[begin:end]
            if re.search(r"^    name: v1$", chunk, re.MULTILINE):
                (entry,) = yaml.load(chunk, Loader=yaml_loader())
                if entry.get("name") == "v1":
                    return group.group(1), entry
    crd = yaml.load(text, Loader=yaml_loader())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == "v1":
            return crd["spec"]["group"], entry
    raise ValueError("the CRD has no v1 version")


def crd_schema(kind: str, directory: str) -> tuple[str, dict[str, Any]]:
    """(apiVersion, JSON schema) of the `v1` version of the CRD for `kind` in `directory`."""
    data = (Path(directory) / CRD_FILES[kind]).read_bytes()
    return _crd_schema_cached(kind, hashlib.sha256(data).hexdigest(), data)


_schema_cache: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}


def _crd_schema_cached(kind: str, digest: str, data: bytes) -> tuple[str, dict[str, Any]]:
    key = (kind, digest)
    if key not in _schema_cache:
        group, entry = _crd_v1(data.decode())
        schema = _convert(entry["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = OBJECT_META
        schema["properties"]["apiVersion"] = {"const": f"{group}/v1"}
        schema["properties"]["kind"] = {"const": kind}
        schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
        _schema_cache[key] = (f"{group}/v1", schema)
    return _schema_cache[key]


# --------------------------------------------------------------------------------------------------------------------
# core kinds: small strict schemas

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DATA_KEYS = {"pattern": r"^[-._a-zA-Z0-9]+$", "maxLength": 253}


def _core(kind: str, props: dict[str, Any], required: Iterable[str] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "apiVersion": {"const": "v1"},
            "kind": {"const": kind},
            "metadata": OBJECT_META,
            **props,
        },
        "required": ["apiVersion", "kind", "metadata", *required],
        "additionalProperties": False,
    }


_QUANTITY_VALUE = {"x-kubernetes-int-or-string": True, "pattern": QUANTITY}
_RESOURCE_LIST = {"type": "object", "additionalProperties": _QUANTITY_VALUE}

CORE_SCHEMAS: dict[str, dict[str, Any]] = {
    "ConfigMap": _core(
        "ConfigMap",
        {
            "data": {**_STRING_MAP, "propertyNames": _DATA_KEYS},
            "binaryData": {**_STRING_MAP, "propertyNames": _DATA_KEYS},
            "immutable": {"type": "boolean"},
        },
    ),
    "Secret": _core(
        "Secret",
        {
            "type": {"type": "string"},
            "data": {
                "type": "object",
                "propertyNames": _DATA_KEYS,
                "additionalProperties": {"type": "string", "pattern": r"^[A-Za-z0-9+/]*={0,2}$"},
            },
            "stringData": {**_STRING_MAP, "propertyNames": _DATA_KEYS},
            "immutable": {"type": "boolean"},
        },
    ),
    "PersistentVolumeClaim": _core(
        "PersistentVolumeClaim",
        {
            "spec": {
                "type": "object",
                "properties": {
                    "accessModes": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]
                        },
                    },
                    "resources": {
                        "type": "object",
                        "properties": {
                            "requests": {
                                **_RESOURCE_LIST,
                                "required": ["storage"],
                            },
                            "limits": _RESOURCE_LIST,
                        },
                        "required": ["requests"],
                        "additionalProperties": False,
                    },
                    "storageClassName": {"type": ["string", "null"]},
                    "volumeMode": {"enum": ["Filesystem", "Block"]},
                    "volumeName": {"type": "string"},
                    "volumeAttributesClassName": {"type": "string"},
                    "selector": {"type": "object"},
                    "dataSource": {"type": "object"},
                    "dataSourceRef": {"type": "object"},
                },
                "required": ["accessModes", "resources"],
                "additionalProperties": False,
            },
            "status": {"type": "object"},
        },
        required=["spec"],
    ),
    "ServiceAccount": _core(
        "ServiceAccount",
        {
            "automountServiceAccountToken": {"type": "boolean"},
            "imagePullSecrets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}},
                    "additionalProperties": False,
                },
            },
            "secrets": {"type": "array", "items": {"type": "object"}},
        },
    ),
    "Namespace": _core(
        "Namespace",
        {
            "spec": {
                "type": "object",
                "properties": {"finalizers": {"type": "array", "items": {"type": "string"}}},
                "additionalProperties": False,
            },
            "status": {"type": "object"},
        },
    ),
}


def schema_validator(schema: Mapping[str, Any]) -> Any:
    """A JSON Schema validator for `schema` with the Kubernetes keywords and the int32/int64 formats."""
    return _K8sValidator(schema, format_checker=_format_checker)
