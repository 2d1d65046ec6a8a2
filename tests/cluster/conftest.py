"""Shared helpers of the k8s tests: the repository's k8s/ manifests and a validator pinned to the test copy of
the KubeRay CRDs (plain functions: `base_docs()` also feeds `parametrize` at collection time)."""

from __future__ import annotations

from pathlib import Path

from fineray.cluster import k8s

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = ROOT / "tests" / "data" / "kuberay-crds"
ENTRYPOINT = (
    "fineray {} /etc/fineray/config.yaml output.dir=/mnt/fineray/runs output.registry=/mnt/fineray/adapters"
)


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


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]
