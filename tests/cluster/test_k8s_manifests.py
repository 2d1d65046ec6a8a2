"""The k8s/ manifests: every document validates against the KubeRay v1.7.0 CRDs, the pieces fit together, the
sample configs are valid run configs, and the overlays render with kustomize."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import pytest
import yaml

from fineray.base import runs
from fineray.cluster import k8s
from tests.cluster.conftest import ENTRYPOINT, K8S, assert_valid, base_docs, containers

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed")


_rendered: dict[str, list[dict]] = {}


def rendered(target: str) -> list[dict]:
    if target not in _rendered:
        path = K8S / target
        proc = subprocess.run(
            [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
        _rendered[target] = k8s.load_yaml_documents(proc.stdout)
    return copy.deepcopy(_rendered[target])


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def cluster_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(label, RayCluster-shaped spec) of every RayCluster, RayJob and RayService."""
    out = []
    for d in docs:
        spec = {
            "RayCluster": lambda s: s,
            "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"],
        }.get(d["kind"])
        if spec:
            out.append((f"{d['kind']}/{d['metadata']['name']}", spec(d["spec"])))
    return out


# ---------------------------------------------------------------------------------------------------- k8s/ files


@pytest.mark.parametrize("label,doc", base_docs(), ids=[label for label, _ in base_docs()])
def test_every_base_document_validates(label, doc):
    assert_valid(doc)


def test_base_has_every_piece():
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for _, d in base_docs())
    assert kinds == [
        "ConfigMap/fineray-config",
        "PersistentVolumeClaim/fineray-shared",
        "RayCluster/fineray",
        "RayJob/fineray-federated",
        "RayJob/fineray-rl",
        "RayJob/fineray-train",
        "RayJob/fineray-tune",
        "RayService/fineray-serve",
        "Secret/fineray-secrets",
    ]


def test_base_raycluster_shape():
    docs = [d for _, d in base_docs()]
    (rc,) = of_kind(docs, "RayCluster")
    spec = rc["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"] == {"mode": "token", "secretName": "fineray-secrets"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"] == {"num-cpus": "0", "num-gpus": "0"}
    assert "nvidia.com/gpu" not in containers(head)[0]["resources"]["limits"]
    (workers,) = spec["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    assert containers(workers)[0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for group in (head, workers):
        c = containers(group)[0]
        assert c["image"] == "fineray:latest"
        assert {"name": "shared", "mountPath": "/mnt/fineray"} in c["volumeMounts"]
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": "fineray-shared"}} in group[
            "template"
        ]["spec"]["volumes"]
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("kind", runs.KINDS)
def test_base_rayjobs(kind):
    docs = [d for _, d in base_docs()]
    (job,) = [d for d in of_kind(docs, "RayJob") if d["metadata"]["name"] == f"fineray-{kind}"]
    spec = job["spec"]
    assert spec["entrypoint"] == ENTRYPOINT.format(kind)
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] >= 0
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert {"name": "config", "mountPath": "/etc/fineray", "readOnly": True} in containers(head)[0][
        "volumeMounts"
    ]
    (config_volume,) = [v for v in head["template"]["spec"]["volumes"] if v["name"] == "config"]
    assert config_volume["configMap"]["name"] == "fineray-config"
    key = {"train": "config.yaml"}.get(kind, f"{kind}.yaml")
    if kind != "train":
        assert config_volume["configMap"]["items"] == [{"key": key, "path": "config.yaml"}]
    # Workers match the config's scaling section.
    (cm,) = of_kind(docs, "ConfigMap")
    scaling = yaml.safe_load(cm["data"][key])["scaling"]
    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == scaling["num_workers"]


def _strip_config_items(spec: dict) -> dict:
    spec = copy.deepcopy(spec)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for v in group["template"]["spec"]["volumes"]:
            if "configMap" in v:
                v["configMap"].pop("items", None)
        for c in containers(group):
            c.pop("ports", None)  # the RayService adds the serve port and the API keys
            c["env"] = [e for e in c["env"] if e["name"] != "FINERAY_API_KEYS"]
        group.pop("replicas", None), group.pop("minReplicas", None), group.pop("maxReplicas", None)
    return spec


def test_job_and_service_clusters_have_the_raycluster_shape():
    docs = [d for _, d in base_docs()]
    specs = cluster_specs(docs)
    reference = _strip_config_items(
        specs[0][1]
        if specs[0][0].startswith("RayCluster")
        else next(s for label, s in specs if label.startswith("RayCluster"))
    )
    for label, spec in specs:
        assert _strip_config_items(spec) == reference, f"{label} drifted from raycluster.yaml"


def test_base_rayservice():
    docs = [d for _, d in base_docs()]
    (svc,) = of_kind(docs, "RayService")
    assert svc["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert serve["http_options"]["port"] == 8000
    (app,) = serve["applications"]
    assert app["import_path"] == "fineray.serve.app:build_app"
    assert app["args"] == {"registry": "/mnt/fineray/adapters", "base": "embedded:smollm2-135m-instruct"}
    (deployment,) = app["deployments"]
    scaling = deployment["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"] and scaling["target_ongoing_requests"] > 0
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert {"name": "serve", "containerPort": 8000} in containers(head)[0]["ports"]


def test_sample_configs_are_valid_run_configs():
    config = pytest.importorskip("fineray.train.config")
    samples = {}
    (cm,) = [d for _, d in base_docs() if d["kind"] == "ConfigMap"]
    samples.update({f"base/{k}": v for k, v in cm["data"].items()})
    for path in sorted((K8S / "overlays" / "cpu-dev" / "configs").glob("*.yaml")):
        samples[f"cpu-dev/{path.name}"] = path.read_text()
    assert len(samples) == 8
    for label, text in samples.items():
        data = yaml.safe_load(text)
        cfg = config.validate_config(data, label)
        assert cfg.cluster.address == "auto", label
        assert cfg.output.dir == "/mnt/fineray/runs" and cfg.output.registry == "/mnt/fineray/adapters", label
        assert cfg.scaling.use_gpu is label.startswith("base/"), label
        if label.endswith("tune.yaml"):
            tune = pytest.importorskip("fineray.tune.config")
            tune.validate_search_space(cfg, tune.parse_tune_config(cfg))
        if label.endswith("rl.yaml"):
            rl = pytest.importorskip("fineray.rl.config")
            assert rl.parse_rl_config(cfg).rewards, label


def test_secret_stub_holds_no_secret():
    (secret,) = [d for _, d in base_docs() if d["kind"] == "Secret"]
    assert set(secret["stringData"]) == {"auth_token", "HF_TOKEN", "FINERAY_API_KEYS"}
    assert all(v == "" for v in secret["stringData"].values())
    assert "data" not in secret


def test_dockerfile():
    text = (K8S / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith("#")]
    words = [i[0] for i in instructions]
    assert words[words.index("FROM") - 1] == "ARG"  # base image overridable
    assert re.search(r"ARG BASE_IMAGE=(rayproject/ray:2\.60\.0-py311-gpu|pytorch/pytorch:\S+cuda\S+)", text)
    users = [i[1].strip() for i in instructions if i[0] == "USER"]
    assert users and users[-1] in ("1000", "1000:1000", "1000:100"), users
    assert "WORKDIR" in words
    assert 'pip install ".[gpu]"' in text
    assert not re.search(r"(?i)(token|password|api_key|secret)\s*=", text)


# ---------------------------------------------------------------------------------------------------- kustomize


@needs_kubectl
@pytest.mark.parametrize("target", ["base", "overlays/cpu-dev", "overlays/gpu"])
def test_kustomize_renders_and_everything_validates(target):
    docs = rendered(target)
    assert of_kind(docs, "RayCluster") and len(of_kind(docs, "RayJob")) == 4 and of_kind(docs, "RayService")
    for doc in docs:
        assert_valid(doc)
    images = {
        c["image"]
        for _, spec in cluster_specs(docs)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for c in containers(group)
    }
    assert len(images) == 1 and "fineray:latest" not in images, images
    for _, spec in cluster_specs(docs):
        assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@needs_kubectl
def test_gpu_overlay():
    docs = rendered("overlays/gpu")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"fineray"}
    assert not of_kind(docs, "Secret"), "the gpu overlay must not ship the Secret stub"
    for label, spec in cluster_specs(docs):
        head = spec["headGroupSpec"]
        assert "nvidia.com/gpu" not in containers(head)[0]["resources"].get("limits", {}), label
        assert "tolerations" not in head["template"]["spec"], label
        assert spec["authOptions"] == {"mode": "token", "secretName": "fineray-secrets"}, label
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            assert containers(group)[0]["resources"]["limits"]["nvidia.com/gpu"] == "1", label
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, label
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
                "tolerations"
            ]
            assert group["maxReplicas"] >= group["minReplicas"], label


@needs_kubectl
def test_cpu_dev_overlay():
    docs = rendered("overlays/cpu-dev")
    assert "nvidia.com/gpu" not in k8s.dump_yaml([d for d in docs if d["kind"] != "ConfigMap"])
    (pvc,) = of_kind(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    (cm,) = of_kind(docs, "ConfigMap")
    for key in ("config.yaml", "tune.yaml", "federated.yaml", "rl.yaml"):
        assert yaml.safe_load(cm["data"][key])["scaling"]["use_gpu"] is False
    for label, spec in cluster_specs(docs):
        assert spec["authOptions"] == {"mode": "token"}, label  # operator-generated token
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] == "cpu-workers"
            limits = containers(group)[0]["resources"]["limits"]
            assert limits == {"cpu": "2", "memory": "4Gi"}, label
