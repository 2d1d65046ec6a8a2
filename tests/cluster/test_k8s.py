"""k8s/ manifests and fineray.cluster.k8s: every manifest validates against the KubeRay v1.7.0 CRDs, the overlays render
with kustomize, render_rayjob sizes jobs from a run config, and bad manifests fail with the field path named."""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fineray.cluster import k8s

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = ROOT / "tests" / "data" / "kuberay-crds"
CRD_SHA256 = {  # ray-project/kuberay v1.7.0, ray-operator/config/crd/bases/
    "ray.io_rayclusters.yaml": "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
    "ray.io_rayjobs.yaml": "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5",
    "ray.io_rayservices.yaml": "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab",
}
ENTRYPOINT = (
    "fineray {} /etc/fineray/config.yaml output.dir=/mnt/fineray/runs output.registry=/mnt/fineray/adapters"
)
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed")


def validate(obj: dict) -> list[str]:
    return k8s.validate_manifest(obj, crds=CRDS)


def assert_valid(obj: dict) -> None:
    errors = validate(obj)
    assert errors == [], f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}:\n" + "\n".join(errors)


def base_docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((K8S / "base").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in k8s.load_yaml_documents(path.read_text()):
            out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


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


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


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


@pytest.mark.parametrize("kind", k8s.KINDS)
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
    assert len(samples) == 6
    for label, text in samples.items():
        data = yaml.safe_load(text)
        cfg = config.validate_config(data, label)
        assert cfg.cluster.address == "auto", label
        assert cfg.output.dir == "/mnt/fineray/runs" and cfg.output.registry == "/mnt/fineray/adapters", label
        assert cfg.scaling.use_gpu is label.startswith("base/"), label
        if label.endswith("tune.yaml"):
            tune = pytest.importorskip("fineray.tune.config")
            tune.validate_search_space(cfg, tune.parse_tune_config(cfg))


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
    assert of_kind(docs, "RayCluster") and len(of_kind(docs, "RayJob")) == 3 and of_kind(docs, "RayService")
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
    for key in ("config.yaml", "tune.yaml", "federated.yaml"):
        assert yaml.safe_load(cm["data"][key])["scaling"]["use_gpu"] is False
    for label, spec in cluster_specs(docs):
        assert spec["authOptions"] == {"mode": "token"}, label  # operator-generated token
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] == "cpu-workers"
            limits = containers(group)[0]["resources"]["limits"]
            assert limits == {"cpu": "2", "memory": "4Gi"}, label


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
    monkeypatch.setattr(k8s, "_kubernetes_validate_errors", lambda obj, version: None)
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
