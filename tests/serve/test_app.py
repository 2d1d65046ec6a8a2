"""The application graph without starting it: `build_app` (KubeRay's import path) wires the ingress, the model
deployment and the metrics hub from the serve config, and the shipped RayService manifest agrees with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fineray.serve.app import MODEL_DEPLOYMENT, build_app
from fineray.serve.config import load_serve_config
from fineray.train.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_build_app_wires_deployments_from_the_config(tmp_path):
    # Execute
    app = build_app({"base": "tiny:llama", "registry": str(tmp_path), "num_cpus_per_replica": 2,
                     "batching.max_batch_size": 8, "autoscaling": {"min_replicas": 1, "max_replicas": 3}})
    # Assert
    ingress = app._bound_deployment
    cfg_dict, source, model_app, hub_app = ingress.init_args
    model = model_app._bound_deployment
    assert ingress.name == "OpenAIIngress" and model.name == MODEL_DEPLOYMENT
    assert hub_app._bound_deployment.name == "MetricsHub"
    assert cfg_dict["base"] == "tiny:llama" and cfg_dict["batching"]["max_batch_size"] == 8
    assert source == (None, {"base": "tiny:llama", "registry": str(tmp_path), "num_cpus_per_replica": 2,
                             "batching.max_batch_size": 8, "autoscaling": {"min_replicas": 1, "max_replicas": 3}})
    assert model.ray_actor_options["num_cpus"] == 2 and model.max_ongoing_requests == 16
    auto = model._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (1, 3)
    assert model.init_args[1] is hub_app  # one hub shared by the ingress and the model replicas


def test_build_app_rejects_unknown_settings():
    with pytest.raises(ConfigError, match="max_batch_sise: unknown key"):
        build_app({"batching.max_batch_sise": 3})


def test_rayservice_manifest_uses_this_app():
    manifest = yaml.safe_load((ROOT / "k8s" / "base" / "rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (application,) = serve_cfg["applications"]
    assert application["import_path"] == "fineray.serve.app:build_app"
    args = dict(application.get("args") or {})
    args.pop("config", None)
    assert load_serve_config(None, args)  # every arg is a valid serve setting
    assert {d["name"] for d in application.get("deployments", [])} <= {MODEL_DEPLOYMENT, "OpenAIIngress"}
