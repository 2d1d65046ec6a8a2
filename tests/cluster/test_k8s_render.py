"""fineray.cluster.k8s rendering: render_rayjob sizes jobs from a run config, names are cleaned, YAML streams
round-trip."""

from __future__ import annotations

import re

import pytest
import yaml

from fineray.cluster import k8s
from tests.cluster.conftest import ENTRYPOINT, assert_valid, containers

# ---------------------------------------------------------------------------------------------------- render_rayjob

SAMPLE = {
    "model": {"base": "embedded:smollm2-135m-instruct"},
    "method": "lora",
    "scaling": {
        "num_workers": 4,
        "use_gpu": True,
        "resources_per_worker": {"CPU": 6, "GPU": 1, "memory": 48 << 30},
    },
    "output": {"dir": "runs", "registry": "adapters", "name": "Support_Tickets v2"},
}


def _job_parts(objs):
    cm, job = objs
    spec = job["spec"]["rayClusterSpec"]
    (workers,) = spec["workerGroupSpecs"]
    return cm, job, spec, workers


def test_render_rayjob_sizes_workers_from_scaling():
    objs = k8s.render_rayjob(SAMPLE, "train", "registry.example.com/fineray:0.1.0")
    cm, job, spec, workers = _job_parts(objs)
    assert [o["kind"] for o in objs] == ["ConfigMap", "RayJob"]
    assert job["metadata"]["name"] == "fineray-train-support-tickets-v2"
    assert cm["metadata"]["name"] == "fineray-train-support-tickets-v2-config"
    assert job["spec"]["entrypoint"] == ENTRYPOINT.format("train")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0 and job["spec"]["backoffLimit"] >= 0
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    limits = containers(workers)[0]["resources"]["limits"]
    assert limits == {"cpu": "6", "memory": "48Gi", "nvidia.com/gpu": "1"}
    assert containers(workers)[0]["resources"]["requests"] == {"cpu": "6", "memory": "48Gi"}
    assert spec["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0", "num-gpus": "0"}
    assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    for group in (spec["headGroupSpec"], workers):
        assert containers(group)[0]["image"] == "registry.example.com/fineray:0.1.0"
        mounts = containers(group)[0]["volumeMounts"]
        assert {"name": "config", "mountPath": "/etc/fineray", "readOnly": True} in mounts
        assert {"name": "shared", "mountPath": "/mnt/fineray"} in mounts
        volumes = group["template"]["spec"]["volumes"]
        assert {"name": "config", "configMap": {"name": cm["metadata"]["name"]}} in volumes
    stored = yaml.safe_load(cm["data"]["config.yaml"])
    assert stored["scaling"] == SAMPLE["scaling"] and stored["cluster"] == {"address": "auto"}
    assert "cluster" not in SAMPLE  # the caller's dict is left alone
    for obj in objs:
        assert_valid(obj)


def test_render_rayjob_cpu_only_and_options():
    cfg = {
        "scaling": {
            "num_workers": 2,
            "use_gpu": False,
            "resources_per_worker": {"CPU": 1.5, "memory": 3 << 29},
        },
        "cluster": {"address": "ray://elsewhere:10001"},
    }
    objs = k8s.render_rayjob(
        cfg,
        "tune",
        "fineray:dev",
        name="Sweep_01",
        storage="/data/",
        namespace="ml",
        max_workers=6,
        auth_secret="fineray-secrets",
    )
    cm, job, spec, workers = _job_parts(objs)
    assert (
        job["metadata"]["name"] == "sweep-01"
        and job["metadata"]["namespace"] == cm["metadata"]["namespace"] == "ml"
    )
    assert job["spec"]["entrypoint"] == (
        "fineray tune /etc/fineray/config.yaml output.dir=/data/runs output.registry=/data/adapters"
    )
    assert (workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (2, 2, 6)
    assert containers(workers)[0]["resources"]["limits"] == {"cpu": "1500m", "memory": "1536Mi"}
    assert "tolerations" not in workers["template"]["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": "fineray-secrets"}
    assert yaml.safe_load(cm["data"]["config.yaml"])["cluster"]["address"] == "ray://elsewhere:10001"
    for obj in objs:
        assert_valid(obj)


def test_render_rayjob_gpu_defaults_and_name_from_hash():
    objs = k8s.render_rayjob({"scaling": {"num_workers": 1, "use_gpu": True}}, "federated", "img:1")
    _, job, _, workers = _job_parts(objs)
    assert re.fullmatch(r"fineray-federated-[0-9a-f]{8}", job["metadata"]["name"])
    assert containers(workers)[0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # fractional GPUs still need a whole device per pod
    objs = k8s.render_rayjob(
        {"scaling": {"num_workers": 1, "use_gpu": True, "resources_per_worker": {"GPU": 1.5}}},
        "train",
        "img:1",
    )
    assert containers(_job_parts(objs)[3])[0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # same config, same name; a different config, another name
    again = k8s.render_rayjob({"scaling": {"num_workers": 1, "use_gpu": True}}, "federated", "img:1")
    other = k8s.render_rayjob({"scaling": {"num_workers": 2, "use_gpu": True}}, "federated", "img:1")
    assert again[1]["metadata"]["name"] == job["metadata"]["name"] != other[1]["metadata"]["name"]


def test_render_rayjob_long_output_name_is_cut_to_the_rayjob_limit():
    objs = k8s.render_rayjob({"output": {"name": "x" * 80}}, "train", "img:1")
    name = objs[1]["metadata"]["name"]
    assert len(name) == 47 and name.startswith("fineray-train-x")
    assert_valid(objs[1])


@pytest.mark.parametrize(
    "cfg,kind,kwargs,message",
    [
        ({}, "serve", {}, "kind must be one of train, tune, federated"),
        ({"scaling": {"num_workers": 0}}, "train", {}, "scaling.num_workers must be a positive integer"),
        ({"scaling": {"num_workers": "2"}}, "train", {}, "scaling.num_workers must be a positive integer"),
        (
            {"scaling": {"use_gpu": False, "resources_per_worker": {"GPU": 1}}},
            "train",
            {},
            "scaling.use_gpu is false",
        ),
        ({"scaling": {"resources_per_worker": {"TPU": 1}}}, "train", {}, "unsupported resource(s) ['TPU']"),
        ({"scaling": {"resources_per_worker": {"CPU": -1}}}, "train", {}, "resources_per_worker.CPU"),
        ({"scaling": {"num_workers": 3}}, "tune", {"max_workers": 2}, "max_workers must be an integer >="),
        ({}, "train", {"storage": "relative/path"}, "storage must be an absolute path"),
        ({}, "train", {"storage": "/"}, "storage must be an absolute path"),
        ({}, "train", {"storage": "/mnt/my data"}, "storage must be an absolute path"),
        ({}, "train", {"namespace": "Bad_NS"}, "namespace 'Bad_NS' is not a valid Kubernetes namespace"),
        ({}, "train", {"name": "9lives"}, "must start with a letter"),
        ({}, "train", {"name": "___"}, "has no letters or digits"),
        ({}, "train", {"name": "a" * 48}, "the limit is 47"),
    ],
)
def test_render_rayjob_errors(cfg, kind, kwargs, message):
    with pytest.raises(ValueError) as e:
        k8s.render_rayjob(cfg, kind, "img:1", **kwargs)
    assert message in str(e.value)


def test_sanitize_name():
    assert k8s.sanitize_name("My_Run.v2 (final)") == "my-run-v2-final"
    assert k8s.sanitize_name("--ok--") == "ok"
    with pytest.raises(ValueError, match=r"RayJob name '123' must start with a letter"):
        k8s.sanitize_name("123", what="RayJob name")
    with pytest.raises(ValueError, match=r"has no letters or digits"):
        k8s.sanitize_name("!!!")
    with pytest.raises(ValueError, match=r"is 64 characters after cleaning .* the limit is 63"):
        k8s.sanitize_name("a" * 64, max_len=63)


def test_dump_yaml_round_trips_as_multi_document_yaml():
    objs = k8s.render_rayjob(SAMPLE, "train", "img:1")
    text = k8s.dump_yaml(objs)
    assert text.startswith("---\n") and text.count("\n---\n") == 1
    assert "config.yaml: |" in text  # embedded config stays readable
    assert f"entrypoint: {ENTRYPOINT.format('train')}\n" in text  # not folded
    assert k8s.load_yaml_documents(text) == objs
    assert k8s.load_yaml_documents(k8s.dump_yaml(objs[0])) == [objs[0]]
