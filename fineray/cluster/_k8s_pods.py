"""The Ray cluster inside a rendered RayJob: head and worker pod templates, workers sized from `scaling`."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from typing import Any

from fineray.cluster._k8s_names import QUANTITY

__all__ = ["cluster_spec", "worker_resources"]

# Default size of a worker pod when `scaling.resources_per_worker` leaves it open.
_DEFAULT_WORKER_CPUS = 4
_DEFAULT_WORKER_MEMORY = "16Gi"


def _quantity(value: Any, *, what: str, memory: bool = False) -> str:
    """A Kubernetes quantity string from a Ray-style number (CPUs, or bytes for memory) or a quantity string."""
    if isinstance(value, str):
        if not re.match(QUANTITY, value):
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


def worker_resources(scaling: Mapping[str, Any]) -> tuple[dict[str, str], int]:
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


def cluster_spec(
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
    ray_version: str,
    config_dir: str,
) -> dict[str, Any]:
    """The `rayClusterSpec` of a RayJob: a head that runs no work, one autoscaled worker group, token auth.

    Every pod mounts the shared PVC at `storage` and the run config ConfigMap at `config_dir`; workers get the
    `worker_limits` (as requests too, less the GPUs) and, with `gpus`, the GPU taint toleration.
    """
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
            {"name": "config", "mountPath": config_dir, "readOnly": True},
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
        "rayVersion": ray_version,
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
