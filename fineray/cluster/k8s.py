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

Rendering lives here (pod templates in `_k8s_pods`); names and formats in `_k8s_names`, YAML streams in
`_k8s_yaml`, the CRD and core-kind schemas in `_k8s_schema`, and validation in `_k8s_validate`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import yaml

from fineray.base.runs import check_kind
from fineray.cluster._k8s_names import (
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    MAX_NAME_LEN,
    derived_name,
    sanitize_name,
)
from fineray.cluster._k8s_pods import cluster_spec, worker_resources
from fineray.cluster._k8s_schema import crd_dir
from fineray.cluster._k8s_validate import validate_manifest
from fineray.cluster._k8s_yaml import dump_yaml, load_yaml_documents

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_STORAGE",
    "RAY_API_VERSION",
    "RAY_VERSION",
    "crd_dir",
    "dump_yaml",
    "load_yaml_documents",
    "render_rayjob",
    "sanitize_name",
    "validate_manifest",
]

RAY_VERSION = "2.60.0"
RAY_API_VERSION = "ray.io/v1"
#: Shared-storage mount point (the PVC) inside every Ray pod.
DEFAULT_STORAGE = "/mnt/fineray"
#: Where the run config ConfigMap is mounted; the config file is `CONFIG_DIR/config.yaml`.
CONFIG_DIR = "/etc/fineray"


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
        kind: `train`, `tune`, `federated` or `rl`.
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
    check_kind(kind)
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
    worker_limits, gpus = worker_resources(scaling)

    digest = _config_digest(config)
    if name is None:
        output = config.get("output") if isinstance(config.get("output"), Mapping) else {}
        name = derived_name(f"fineray-{kind}", output.get("name"), digest, MAX_NAME_LEN["RayJob"])
    name = sanitize_name(name, max_len=MAX_NAME_LEN["RayJob"], what="RayJob name")
    if namespace is not None and (
        not isinstance(namespace, str) or not DNS1123_LABEL.match(namespace) or len(namespace) > 63
    ):
        raise ValueError(f"namespace {namespace!r} is not a valid Kubernetes namespace (DNS-1123 label)")
    for what, value in (("pvc", pvc), ("auth_secret", auth_secret)):
        if value is not None and (not isinstance(value, str) or not re.match(DNS1123_SUBDOMAIN, value)):
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
            "rayClusterSpec": cluster_spec(
                image=image,
                config_map=config_map_name,
                storage=storage,
                pvc=pvc,
                replicas=num_workers,
                max_replicas=max_workers,
                worker_limits=worker_limits,
                gpus=gpus,
                auth_secret=auth_secret,
                ray_version=RAY_VERSION,
                config_dir=CONFIG_DIR,
            ),
        },
    }
    return [config_map, rayjob]
