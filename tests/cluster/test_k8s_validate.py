"""fineray.cluster.k8s validation: the CRD copies are the pinned KubeRay release, and bad manifests fail with the
field path named."""

from __future__ import annotations

import copy
import hashlib

import pytest
import yaml

from fineray.cluster import _k8s_validate, k8s
from tests.cluster.conftest import CRDS, ROOT, assert_valid, base_docs, validate

CRD_SHA256 = {  # ray-project/kuberay v1.7.0, ray-operator/config/crd/bases/
    "ray.io_rayclusters.yaml": "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
    "ray.io_rayjobs.yaml": "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5",
    "ray.io_rayservices.yaml": "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab",
}


# ---------------------------------------------------------------------------------------------------- CRD data


def test_crd_copies_are_the_pinned_kuberay_release():
    for folder in (CRDS, ROOT / "fineray" / "cluster" / "_crds"):
        names = sorted(p.name for p in folder.glob("*.yaml"))
        assert names == sorted(CRD_SHA256), folder
        for name, digest in CRD_SHA256.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, folder / name


def test_crds_have_the_fields_the_manifests_rely_on():
    raw = yaml.load(
        (CRDS / "ray.io_rayclusters.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )
    v1 = next(v for v in raw["spec"]["versions"] if v["name"] == "v1")
    spec = v1["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["authOptions"]["properties"]["mode"]["enum"] == ["disabled", "token"]
    assert "secretName" in spec["authOptions"]["properties"]


# ---------------------------------------------------------------------------------------------------- validator


def _base_doc(kind: str, name: str | None = None) -> dict:
    for _, d in base_docs():
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name):
            return d
    raise LookupError(kind)


def _set(obj: dict, path: str, value) -> None:
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = obj
    for p in parts[:-1]:
        node = node[p]
    if value is _DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value


_DELETE = object()
_W = "spec.workerGroupSpecs.0"
_JW = "spec.rayClusterSpec.workerGroupSpecs.0"


@pytest.mark.parametrize(
    "kind,path,value,expected",
    [
        (
            "RayCluster",
            f"{_W}.replicas",
            "two",
            "spec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'",
        ),
        (
            "RayCluster",
            f"{_W}.rayStartParams",
            {"num-gpus": 1},
            "spec.workerGroupSpecs[0].rayStartParams.num-gpus: 1 is not of type 'string'",
        ),
        ("RayCluster", f"{_W}.maxReplica", 3, "spec.workerGroupSpecs[0].maxReplica: unknown field"),
        (
            "RayCluster",
            f"{_W}.template",
            _DELETE,
            "spec.workerGroupSpecs[0].template: required field is missing",
        ),
        (
            "RayCluster",
            f"{_W}.maxReplicas",
            1 << 40,
            "spec.workerGroupSpecs[0].maxReplicas: 1099511627776 is not a 'int32'",
        ),
        (
            "RayCluster",
            f"{_W}.minReplicas",
            9,
            "spec.workerGroupSpecs[0].minReplicas: 9 is greater than maxReplicas 4",
        ),
        (
            "RayCluster",
            f"{_W}.template.spec.containers.0.resources.limits.cpu",
            0.5,
            "spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.cpu: 0.5 must be an integer or a string",
        ),
        (
            "RayCluster",
            f"{_W}.template.spec.containers.0.resources.limits.memory",
            "lots",
            "spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.memory: 'lots' is not a Kubernetes quantity",
        ),
        (
            "RayCluster",
            "spec.headGroupSpec.template.spec.containers.0.ports.1.containerPort",
            6379,
            "spec.headGroupSpec.template.spec.containers[0].ports: duplicate entry (containerPort=6379, protocol='TCP')",
        ),
        (
            "RayCluster",
            "spec.authOptions.mode",
            "tokens",
            "spec.authOptions.mode: 'tokens' is not one of ['disabled', 'token']",
        ),
        ("RayCluster", "spec.rayVersion", "2.40.0", "spec.rayVersion: token auth needs Ray >= 2.52.0"),
        (
            "RayCluster",
            "spec.enableInTreeAutoscaling",
            "yes",
            "spec.enableInTreeAutoscaling: 'yes' is not of type 'boolean'",
        ),
        (
            "RayCluster",
            "spec.managedBy",
            "someone",
            "spec.managedBy: the managedBy field value must be either",
        ),
        ("RayCluster", "metadata.name", "Fine_Ray", "metadata.name: 'Fine_Ray' is not a valid name"),
        ("RayCluster", "metadata.name", "1fineray", "metadata.name: '1fineray' is not a DNS-1035 label"),
        (
            "RayCluster",
            "metadata.labels",
            {"app": "a b"},
            "metadata.labels.app: 'a b' is not a valid label value",
        ),
        (
            "RayCluster",
            "apiVersion",
            "ray.io/v1alpha1",
            "apiVersion: 'ray.io/v1alpha1' is not supported for RayCluster",
        ),
        (
            "RayCluster",
            "spec.headGroupSpec.template.spec.containers",
            [],
            "spec.headGroupSpec.template.spec.containers: the head group needs at least one container",
        ),
        (
            "RayJob",
            f"{_JW}.replicas",
            "two",
            "spec.rayClusterSpec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'",
        ),
        (
            "RayJob",
            "spec.shutdownAfterJobFinishes",
            False,
            "spec.ttlSecondsAfterFinished: needs spec.shutdownAfterJobFinishes",
        ),
        ("RayJob", "spec.backoffLimit", "1", "spec.backoffLimit: '1' is not of type 'integer'"),
        (
            "RayJob",
            "spec.entrypoint",
            ["fineray", "train"],
            "spec.entrypoint: ['fineray', 'train'] is not of type 'string'",
        ),
        (
            "RayJob",
            "metadata.name",
            "f" * 48,
            "metadata.name: RayJob names must be at most 47 characters, got 48",
        ),
        (
            "RayService",
            "spec.upgradeStrategy.type",
            "Rolling",
            "spec.upgradeStrategy.type: 'Rolling' is not one of",
        ),
        (
            "RayService",
            "spec.serveConfigV2",
            {"applications": []},
            "spec.serveConfigV2: {'applications': []} is not of type 'string'",
        ),
        (
            "RayService",
            "spec.serveConfigV2",
            "applications: [{name: x}]",
            "spec.serveConfigV2.applications[0].import_path: required",
        ),
        ("RayService", "spec.rayClusterConfig", _DELETE, "spec.rayClusterConfig: required field is missing"),
        ("ConfigMap", "data.extra", 3, "data.extra: 3 is not of type 'string'"),
        ("ConfigMap", "spec", {}, "spec: unknown field"),
        ("Secret", "stringData.bad key", "x", "stringData: invalid key 'bad key'"),
        ("PersistentVolumeClaim", "spec.accessModes", ["RWX"], "spec.accessModes[0]: 'RWX' is not one of"),
        (
            "PersistentVolumeClaim",
            "spec.resources.requests.storage",
            "big",
            "spec.resources.requests.storage: 'big' is not a Kubernetes quantity",
        ),
        ("PersistentVolumeClaim", "metadata.name", _DELETE, "metadata.name: required field is missing"),
    ],
)
def test_invalid_manifests_name_the_bad_field(kind, path, value, expected):
    doc = copy.deepcopy(_base_doc(kind))
    _set(doc, path, value)
    errors = validate(doc)
    assert any(e.startswith(expected) for e in errors), errors


def test_validator_edge_cases():
    assert k8s.validate_manifest([]) == ["<root>: a manifest must be a mapping, got list"]
    assert validate({"apiVersion": "v1"}) == ["kind: required field is missing"]
    assert validate({"kind": "RayJob"}) == ["apiVersion: required field is missing"]
    assert validate({"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": {"name": "x"}})[
        0
    ].startswith("kind: 'RayCronJob' is not a KubeRay kind")
    job = _base_doc("RayJob")
    # int-or-string: an integer quantity is fine, and nullable/defaulted required fields behave like the API server
    ok = copy.deepcopy(job)
    ok["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]["cpu"] = 8
    del ok["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"]  # required, but defaulted to 0
    assert_valid(ok)
    # every problem is reported, not just the first
    bad = copy.deepcopy(job)
    bad["spec"]["backoffLimit"] = "x"
    bad["spec"]["bogus"] = 1
    assert len(validate(bad)) == 2


def test_unknown_core_kind_without_kubernetes_validate(monkeypatch):
    monkeypatch.setattr(_k8s_validate, "_kubernetes_validate_errors", lambda obj, version: None)
    errors = validate({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}})
    assert errors and errors[0].startswith("kind: no schema for apps/v1 Deployment")


def test_validate_with_packaged_crds():
    assert k8s.crd_dir().name == "_crds"
    assert k8s.validate_manifest(_base_doc("RayCluster")) == []


def test_kubernetes_validate_when_installed():
    pytest.importorskip("kubernetes_validate")
    pvc = copy.deepcopy(_base_doc("PersistentVolumeClaim"))
    assert validate(pvc) == []
    pvc["spec"]["storageClass"] = "nfs"
    assert any(e.startswith("spec") for e in validate(pvc))
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"replicas": "two"},
    }
    assert any("replicas" in e for e in validate(deployment))
