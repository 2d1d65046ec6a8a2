"""Serving: registered adapters behind an OpenAI-compatible API on Ray Serve, and offline batch generation.

Public API (heavy modules load lazily, so importing the config is cheap):
    ServeConfig, load_serve_config      typed config (`configs/serve.yaml`)
    run_server(cfg, blocking=True)      `fineray serve`
    build_app(args)                     KubeRay RayService import path `fineray.serve.app:build_app`
    generate_offline(...)               `fineray generate` (Ray Data across workers)
    Engine                              the batched multi-adapter generation engine (no Ray needed)
"""

from __future__ import annotations

from fineray.base.lazy import lazy_exports
from fineray.serve.config import ServeConfig, load_serve_config

__all__ = ["Engine", "ServeConfig", "build_app", "generate_offline", "load_serve_config", "run_server"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "run_server": "fineray.serve.server",
    "build_app": "fineray.serve.app",
    "generate_offline": "fineray.serve.offline",
    "Engine": "fineray.serve.engine",
})
