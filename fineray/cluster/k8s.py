"""Kubernetes manifests for fineray on KubeRay: render RayJobs from a run config, and validate manifests offline.

Pure functions: nothing here talks to a cluster or needs `kubectl`.

* `render_rayjob(run_config, kind, image)` turns a fineray run config into a ConfigMap (holding the config
  YAML, mounted at `/etc/fineray`) plus a `ray.io/v1` RayJob whose worker group is sized from the config's
  `scaling` section. `dump_yaml(objs)` writes them as one multi-document YAML stream for `kubectl apply -f -`.
* `validate_manifest(obj)` checks one object and returns a list of `path: problem` strings (empty when valid):
  RayCluster / RayJob / RayService against the OpenAPI v3 schema of the official KubeRay v1.7.0 CRDs (shipped in
  `fineray/cluster/_crds/`, byte-identical to `ray-operator/config/crd/bases/` at that tag), plus the name and
  spec rules the KubeRay operator enforces itself; ConfigMap / Secret / PersistentVolumeClaim / ServiceAccount /
  Namespace against small strict hand-written schemas. When the optional `kubernetes-validate` package is
  installed, core kinds are also checked against its bundled (offline) Kubernetes schemas, which covers every
  other built-in kind too.

The CRD schemas are read the way the API server reads them (structural schemas): unknown fields are errors (as with
`kubectl apply --validate=strict`, the default), `x-kubernetes-int-or-string` fields take an integer or a string,
`nullable` allows null, `x-kubernetes-preserve-unknown-fields` allows any field, required fields that carry a
`default` may be omitted (the API server fills them in), `x-kubernetes-list-type: map|set` lists reject duplicate
keys, and `int32`/`int64` formats are range-checked. CEL rules (`x-kubernetes-validations`) are not evaluated, except
the simple `self in [...]` form.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator, FormatChecker, ValidationError, validators

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_STORAGE",
    "KINDS",
    "RAY_API_VERSION",
    "RAY_VERSION",
    "crd_dir",
    "dump_yaml",
    "load_yaml_documents",
    "render_rayjob",
    "sanitize_name",
    "validate_manifest",
]

#: fineray commands that can run as a RayJob.
KINDS = ("train", "tune", "federated")
RAY_VERSION = "2.60.0"
RAY_API_VERSION = "ray.io/v1"
#: Shared-storage mount point (the PVC) inside every Ray pod.
DEFAULT_STORAGE = "/mnt/fineray"
#: Where the run config ConfigMap is mounted; the config file is `CONFIG_DIR/config.yaml`.
CONFIG_DIR = "/etc/fineray"

# Limits the KubeRay operator enforces on names (its Service names append suffixes to them).
_MAX_NAME_LEN = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"

# Default size of a worker pod when `scaling.resources_per_worker` leaves it open.
_DEFAULT_WORKER_CPUS = 4
_DEFAULT_WORKER_MEMORY = "16Gi"

_CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}


# --------------------------------------------------------------------------------------------------------------------
# names


def sanitize_name(raw: str, *, max_len: int = 47, what: str = "name") -> str:
    """Turn `raw` into a DNS-1035 label (lowercase letters, digits and `-`, starting with a letter).

    Cosmetic problems are fixed: upper case is lowered and runs of other characters (`_`, `.`, spaces, `/`) become
    one `-`. Anything that would need a guess is an error (`ValueError` naming the input): nothing left after
    cleaning, a first character that is not a letter, or more than `max_len` characters (47 for a RayJob or
    RayService, whose generated cluster and Service names add suffixes; 53 for a RayCluster; 63 for a label).
    """
    if not isinstance(raw, str):
        raise TypeError(f"{what} must be a string, got {type(raw).__name__}")
    name = re.sub(r"[^a-z0-9]+", "-", raw.strip().lower()).strip("-")
    if not name:
        raise ValueError(f"{what} {raw!r} has no letters or digits: cannot make a Kubernetes name from it")
    if not name[0].isalpha():
        raise ValueError(
            f"{what} {raw!r} must start with a letter (Kubernetes DNS-1035 label, e.g. 'run-{name}')"
        )
    if len(name) > max_len:
        raise ValueError(
            f"{what} {raw!r} is {len(name)} characters after cleaning ({name!r}); the limit is {max_len}"
        )
    return name


def _derived_name(prefix: str, slug: str | None, digest: str, max_len: int) -> str:
    """`prefix-slug` (slug cleaned and cut to fit) or `prefix-digest` when there is no usable slug."""
    if slug:
        cleaned = re.sub(r"[^a-z0-9]+", "-", str(slug).lower()).strip("-")
        if cleaned:
            room = max_len - len(prefix) - 1
            return f"{prefix}-{cleaned[:room].rstrip('-')}"
    return f"{prefix}-{digest}"[:max_len].rstrip("-")


# --------------------------------------------------------------------------------------------------------------------
# rendering


def _quantity(value: Any, *, what: str, memory: bool = False) -> str:
    """A Kubernetes quantity string from a Ray-style number (CPUs, or bytes for memory) or a quantity string."""
    if isinstance(value, str):
        if not re.match(_QUANTITY, value):
            raise ValueError(f"{what}: {value!r} is not a Kubernetes quantity (e.g. '4', '500m', '16Gi')")
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value <= 0
        or not math.isfinite(value)
    ):
        raise ValueError(f"{what}: expected a positive number or a Kubernetes quantity, got {value!r}")
    if memory:  # Ray counts memory in bytes
        n = math.ceil(value)
        for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
            if n % size == 0:
                return f"{n // size}{unit}"
        return str(n)
    if float(value).is_integer():
        return str(int(value))
    return f"{math.ceil(value * 1000)}m"


def _worker_resources(scaling: Mapping[str, Any]) -> tuple[dict[str, str], int]:
    """Container limits for one Ray Train worker pod, and its GPU count."""
    rpw = dict(scaling.get("resources_per_worker") or {})
    use_gpu = bool(scaling.get("use_gpu", False))
    gpu_req = rpw.pop("GPU", None)
    cpu = rpw.pop("CPU", _DEFAULT_WORKER_CPUS)
    mem = rpw.pop("memory", None)
    # Ray puts accelerator_type:<model> on GPU nodes by itself; other custom resources have no pod equivalent.
    unknown = sorted(k for k in rpw if not str(k).startswith("accelerator_type:"))
    if unknown:
        raise ValueError(
            f"scaling.resources_per_worker: unsupported resource(s) {unknown}; a worker pod can be sized from "
            "CPU, GPU and memory only (add custom Ray resources to the worker group by hand)"
        )
    if gpu_req is not None and (
        isinstance(gpu_req, bool) or not isinstance(gpu_req, (int, float)) or gpu_req < 0
    ):
        raise ValueError(f"scaling.resources_per_worker.GPU: expected a non-negative number, got {gpu_req!r}")
    if not use_gpu and gpu_req:
        raise ValueError("scaling.resources_per_worker asks for GPUs but scaling.use_gpu is false")
    # A pod holds whole GPUs: a fractional request (several workers sharing a GPU) still needs one device.
    gpus = (math.ceil(gpu_req) if gpu_req else 1) if use_gpu else 0
    limits = {"cpu": _quantity(cpu, what="scaling.resources_per_worker.CPU")}
    limits["memory"] = (
        _quantity(mem, what="scaling.resources_per_worker.memory", memory=True)
        if mem is not None
        else _DEFAULT_WORKER_MEMORY
    )
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return limits, gpus


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _cluster_spec(
    *,
    image: str,
    config_map: str,
    storage: str,
    pvc: str,
    replicas: int,
    max_replicas: int,
    worker_limits: Mapping[str, str],
    gpus: int,
    auth_secret: str | None,
) -> dict[str, Any]:
    env = [
        {"name": "HF_HOME", "value": f"{storage}/cache/huggingface"},
        {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "fineray-secrets", "key": "HF_TOKEN", "optional": True}},
        },
    ]

    def volumes(extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        return [
            {"name": "shared", "persistentVolumeClaim": {"claimName": pvc}},
            {"name": "config", "configMap": {"name": config_map}},
            *(extra or []),
        ]

    def mounts(extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        return [
            {"name": "shared", "mountPath": storage},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            *(extra or []),
        ]

    head = {
        "rayStartParams": {"num-cpus": "0", "num-gpus": "0"},  # nothing is scheduled on the head
        "template": {
            "spec": {
                "securityContext": _pod_security(),
                "containers": [
                    {
                        "name": "ray-head",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "ports": [
                            {"name": "gcs-server", "containerPort": 6379},
                            {"name": "dashboard", "containerPort": 8265},
                            {"name": "client", "containerPort": 10001},
                        ],
                        "resources": {
                            "requests": {"cpu": "2", "memory": "8Gi"},
                            "limits": {"cpu": "2", "memory": "8Gi"},
                        },
                        "env": copy.deepcopy(env),
                        "volumeMounts": mounts(),
                        "securityContext": _container_security(),
                    }
                ],
                "volumes": volumes(),
            }
        },
    }
    requests = {k: v for k, v in worker_limits.items() if k != "nvidia.com/gpu"}
    worker_pod: dict[str, Any] = {
        "securityContext": _pod_security(),
        "containers": [
            {
                "name": "ray-worker",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "resources": {"requests": requests, "limits": dict(worker_limits)},
                "env": copy.deepcopy(env),
                "volumeMounts": mounts([{"name": "dshm", "mountPath": "/dev/shm"}]),
                "securityContext": _container_security(),
            }
        ],
        "volumes": volumes([{"name": "dshm", "emptyDir": {"medium": "Memory"}}]),
    }
    if gpus:
        worker_pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    spec: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", **({"secretName": auth_secret} if auth_secret else {})},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 300,
            "resources": {
                "requests": {"cpu": "500m", "memory": "512Mi"},
                "limits": {"cpu": "1", "memory": "1Gi"},
            },
        },
        "headGroupSpec": head,
        "workerGroupSpecs": [
            {
                "groupName": "gpu-workers" if gpus else "cpu-workers",
                "replicas": replicas,
                "minReplicas": replicas,
                "maxReplicas": max_replicas,
                "rayStartParams": {},
                "template": {"spec": worker_pod},
            }
        ],
    }
    return spec


def _config_digest(run_config: Mapping[str, Any]) -> str:
    blob = json.dumps(run_config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def render_rayjob(
    run_config: dict,
    kind: str,
    image: str,
    *,
    name: str | None = None,
    storage: str = DEFAULT_STORAGE,
    namespace: str | None = None,
    max_workers: int | None = None,
    pvc: str = "fineray-shared",
    auth_secret: str | None = None,
) -> list[dict]:
    """A ConfigMap with the run config plus a RayJob that runs `fineray <kind>` on a fresh KubeRay cluster.

    Args:
        run_config: a fineray run config as plain data (e.g. `RunConfig.to_dict()` or the loaded YAML).
            `scaling.num_workers` sets the worker replicas; `scaling.use_gpu` gives each worker pod one GPU
            (or `ceil(resources_per_worker.GPU)`); `resources_per_worker.CPU` / `.memory` (bytes, or a quantity
            string) size the pod (defaults: 4 CPUs, 16Gi). An empty `cluster.address` becomes `auto` in the
            stored config, so the job joins the RayJob's cluster instead of starting a private Ray.
        kind: `train`, `tune` or `federated`.
        image: the fineray container image for the head and worker pods.
        name: RayJob name (cleaned by `sanitize_name`, at most 47 characters); by default
            `fineray-<kind>-<output.name>` or `fineray-<kind>-<hash of the config>`. The ConfigMap is `<name>-config`.
        storage: where the shared PVC is mounted; the job writes `<storage>/runs` and `<storage>/adapters`.
        namespace: set on both objects when given.
        max_workers: autoscaling ceiling of the worker group (default: `num_workers`; raise it for tune sweeps
            that run trials concurrently).
        pvc: name of the shared-storage PersistentVolumeClaim (see `k8s/base/pvc.yaml`).
        auth_secret: Secret holding the Ray auth token under `auth_token`; by default the KubeRay operator
            generates one for the job's cluster.

    Returns:
        `[configmap, rayjob]`, plain dicts ready for `dump_yaml`.

    Raises:
        ValueError: unknown kind, bad scaling values, or a name that cannot be made DNS-1035 valid.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if not isinstance(run_config, Mapping):
        raise TypeError(f"run_config must be a mapping, got {type(run_config).__name__}")
    if not isinstance(image, str) or not image or any(c.isspace() for c in image):
        raise ValueError(f"image must be a non-empty image reference without spaces, got {image!r}")
    if not isinstance(storage, str) or not re.fullmatch(r"(/[A-Za-z0-9._-]+)+/?", storage):
        raise ValueError(
            f"storage must be an absolute path inside the pods (letters, digits, '.', '_', '-'), got {storage!r}"
        )
    storage = storage.rstrip("/")
    config = copy.deepcopy(dict(run_config))
    scaling = config.get("scaling") or {}
    if not isinstance(scaling, Mapping):
        raise TypeError("run_config.scaling must be a mapping")
    num_workers = scaling.get("num_workers", 2)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"scaling.num_workers must be a positive integer, got {num_workers!r}")
    if max_workers is None:
        max_workers = num_workers
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < num_workers:
        raise ValueError(
            f"max_workers must be an integer >= scaling.num_workers ({num_workers}), got {max_workers!r}"
        )
    worker_limits, gpus = _worker_resources(scaling)

    digest = _config_digest(config)
    if name is None:
        output = config.get("output") if isinstance(config.get("output"), Mapping) else {}
        name = _derived_name(f"fineray-{kind}", output.get("name"), digest, _MAX_NAME_LEN["RayJob"])
    name = sanitize_name(name, max_len=_MAX_NAME_LEN["RayJob"], what="RayJob name")
    if namespace is not None and (
        not isinstance(namespace, str) or not _DNS1123_LABEL.match(namespace) or len(namespace) > 63
    ):
        raise ValueError(f"namespace {namespace!r} is not a valid Kubernetes namespace (DNS-1123 label)")
    for what, value in (("pvc", pvc), ("auth_secret", auth_secret)):
        if value is not None and (not isinstance(value, str) or not re.match(_DNS1123_SUBDOMAIN, value)):
            raise ValueError(f"{what} {value!r} is not a valid Kubernetes object name")

    cluster = config.get("cluster")
    if cluster is None:
        cluster = config["cluster"] = {}
    if isinstance(cluster, dict) and not cluster.get("address"):
        cluster["address"] = "auto"

    config_map_name = f"{name}-config"
    labels = {
        "app.kubernetes.io/name": "fineray",
        "app.kubernetes.io/component": kind,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "fineray",
    }

    def meta(obj_name: str) -> dict[str, Any]:
        m: dict[str, Any] = {"name": obj_name}
        if namespace is not None:
            m["namespace"] = namespace
        m["labels"] = dict(labels)
        m["annotations"] = {"fineray.io/config-hash": digest}
        return m

    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(config_map_name),
        "data": {"config.yaml": yaml.safe_dump(config, sort_keys=False, default_flow_style=False)},
    }
    entrypoint = f"fineray {kind} {CONFIG_DIR}/config.yaml output.dir={storage}/runs output.registry={storage}/adapters"
    rayjob = {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayJob",
        "metadata": meta(name),
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 1,
            "rayClusterSpec": _cluster_spec(
                image=image,
                config_map=config_map_name,
                storage=storage,
                pvc=pvc,
                replicas=num_workers,
                max_replicas=max_workers,
                worker_limits=worker_limits,
                gpus=gpus,
                auth_secret=auth_secret,
            ),
        },
    }
    return [config_map, rayjob]


# --------------------------------------------------------------------------------------------------------------------
# YAML


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # Multi-line strings (embedded configs, serveConfigV2) as readable `|` blocks.
    if "\n" in data and not any(line != line.rstrip() for line in data.splitlines()):
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(objs: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> str:
    """Objects as one multi-document YAML stream (`---` between documents), keys in insertion order."""
    if isinstance(objs, Mapping):
        objs = [objs]
    return yaml.dump_all(
        [dict(o) for o in objs],
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        explicit_start=True,
        width=4096,
    )


def _loader() -> type:
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml_documents(text: str) -> list[dict]:
    """The non-empty documents of a (multi-document) YAML stream."""
    return [d for d in yaml.load_all(text, Loader=_loader()) if d is not None]


# --------------------------------------------------------------------------------------------------------------------
# CRD schemas -> JSON Schema


def crd_dir() -> Path:
    """Folder holding the KubeRay CRDs: the copy shipped in the package (`fineray/cluster/_crds`), or in a source
    checkout whose package copy is missing, `tests/data/kuberay-crds`."""
    here = Path(__file__).resolve().parent
    packaged = here / "_crds"
    if (packaged / _CRD_FILES["RayCluster"]).is_file():
        return packaged
    checkout = here.parents[1] / "tests" / "data" / "kuberay-crds"
    return checkout if (checkout / _CRD_FILES["RayCluster"]).is_file() else packaged


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

_LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

_OBJECT_META: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": _DNS1123_SUBDOMAIN},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": _DNS1123_LABEL.pattern},
        "labels": {
            "type": "object",
            "propertyNames": {"maxLength": 316, "pattern": _LABEL_KEY},
            "additionalProperties": {"type": "string", "maxLength": 63, "pattern": _LABEL_VALUE},
        },
        "annotations": {
            "type": "object",
            "propertyNames": {"pattern": _LABEL_KEY},
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
                (entry,) = yaml.load(chunk, Loader=_loader())
                if entry.get("name") == "v1":
                    return group.group(1), entry
    crd = yaml.load(text, Loader=_loader())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == "v1":
            return crd["spec"]["group"], entry
    raise ValueError("the CRD has no v1 version")


def _crd_schema(kind: str, directory: str) -> tuple[str, dict[str, Any]]:
    """(apiVersion, JSON schema) of the `v1` version of the CRD for `kind` in `directory`."""
    data = (Path(directory) / _CRD_FILES[kind]).read_bytes()
    return _crd_schema_cached(kind, hashlib.sha256(data).hexdigest(), data)


_schema_cache: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}


def _crd_schema_cached(kind: str, digest: str, data: bytes) -> tuple[str, dict[str, Any]]:
    key = (kind, digest)
    if key not in _schema_cache:
        group, entry = _crd_v1(data.decode())
        schema = _convert(entry["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = _OBJECT_META
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
            "metadata": _OBJECT_META,
            **props,
        },
        "required": ["apiVersion", "kind", "metadata", *required],
        "additionalProperties": False,
    }


_QUANTITY_VALUE = {"x-kubernetes-int-or-string": True, "pattern": _QUANTITY}
_RESOURCE_LIST = {"type": "object", "additionalProperties": _QUANTITY_VALUE}

_CORE_SCHEMAS: dict[str, dict[str, Any]] = {
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


# --------------------------------------------------------------------------------------------------------------------
# validation


_PATTERN_NAMES = {
    _QUANTITY: "a Kubernetes quantity (e.g. 4, '500m', '16Gi')",
    _DNS1123_SUBDOMAIN: "a valid name (DNS-1123 subdomain: lowercase letters, digits, '-' and '.')",
    _DNS1123_LABEL.pattern: "a valid DNS-1123 label (lowercase letters, digits and '-')",
    _LABEL_VALUE: "a valid label value (at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends)",
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
    if err.validator == "anyOf" and err.schema is _OBJECT_META:
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
    if not isinstance(name, str) or kind not in _MAX_NAME_LEN:
        return []
    msgs = []
    if len(name) > _MAX_NAME_LEN[kind]:
        msgs.append(
            f"metadata.name: {kind} names must be at most {_MAX_NAME_LEN[kind]} characters, got {len(name)}"
        )
    if not _DNS1035_LABEL.match(name):
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
        if kind not in _CRD_FILES:
            return [f"kind: {kind!r} is not a KubeRay kind ({', '.join(_CRD_FILES)})"]
        expected, schema = _crd_schema(kind, str(Path(crds) if crds is not None else crd_dir()))
        if api_version != expected:
            return [f"apiVersion: {api_version!r} is not supported for {kind}; use {expected!r}"]
        msgs = _schema_errors(_K8sValidator(schema, format_checker=_format_checker), obj)
        if not any(m.startswith("metadata.name:") for m in msgs):
            msgs += _name_rules(obj)
        if not msgs:
            msgs += _ray_rules(obj)
        return _dedupe(msgs)

    msgs: list[str] = []
    schema = _CORE_SCHEMAS.get(kind) if api_version == "v1" else None
    if schema is not None:
        msgs += _schema_errors(_K8sValidator(schema, format_checker=_format_checker), obj)
        if msgs:  # kubernetes-validate reports only its first error, most likely one of these
            return _dedupe(msgs)
    extra = _kubernetes_validate_errors(obj, kube_version)
    if extra is not None:
        msgs += extra
    elif schema is None:
        return [
            (
                f"kind: no schema for {api_version} {kind} (built in: v1 {', '.join(sorted(_CORE_SCHEMAS))}, and "
                "ray.io/v1 RayCluster, RayJob, RayService; install kubernetes-validate for other kinds)"
            )
        ]
    return _dedupe(msgs)


def _dedupe(msgs: list[str]) -> list[str]:
    return list(dict.fromkeys(msgs))
