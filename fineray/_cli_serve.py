"""`fineray serve`, `fineray generate` and `fineray score`: registered adapters online (Ray Serve) and offline
(Ray Data), reward models scoring conversations offline."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fineray._cli_common import console, fail, user_errors

__all__ = ["generate", "score", "serve"]


def serve(registry: str | None = typer.Option(None, help="Adapter registry (path or URI)."),
          base: str | None = typer.Option(None, help="Base model (default: embedded SmolLM2)."),
          config: Path | None = typer.Option(None, "--config", help="Serve config YAML (configs/serve.yaml)."),
          host: str | None = typer.Option(None, help="Bind address (loopback unless API keys are set)."),
          port: int | None = typer.Option(None, help="HTTP port (default 8000)."),
          api_keys_file: str | None = typer.Option(None, help="API keys file (YAML/JSON)."),
          device: str | None = typer.Option(None, help="auto | cpu | cuda"),
          engine: str | None = typer.Option(None, help="auto | builtin | vllm (vLLM must be installed)"),
          log_requests: str | None = typer.Option(None, "--log-requests",
                                                  help="Log responses (PII-redacted, Parquet) to this folder or URI "
                                                       "and accept POST /v1/feedback.")) -> None:
    """Serve registered adapters behind an OpenAI-compatible API on Ray Serve."""
    from fineray.serve import load_serve_config
    from fineray.serve.server import run_server
    from fineray.train.config import ConfigError

    try:
        cfg = load_serve_config(config, {"registry": registry, "base": base, "host": host, "port": port,
                                         "api_keys_file": api_keys_file, "device": device,
                                         "engine": engine, "log_requests": log_requests})
        run_server(cfg, blocking=True)
    except (ConfigError, RuntimeError) as e:
        fail(str(e), 1)


def generate(model: str | None = typer.Option(None, "--model", help="Adapter name[@vN] (default: the base)."),
             input: Path = typer.Option(..., "--input", help="JSONL of prompts ({prompt} or {messages})."),
             output: Path = typer.Option(..., "--output", help="JSONL to write completions to."),
             registry: str = typer.Option("adapters", help="Adapter registry (path or URI)."),
             base: str | None = typer.Option(None, help="Base model (default: the adapter's manifest)."),
             num_workers: int = typer.Option(2, help="Ray Data workers."),
             max_tokens: int = typer.Option(256), temperature: float = typer.Option(0.0),
             batch_size: int = typer.Option(16), use_gpu: bool = typer.Option(False, "--gpu"),
             critique: Path | None = typer.Option(None, "--critique", help="Constitution YAML: answer, critique "
                                                  "and revise each prompt; --output gets preference pairs."),
             sft_output: Path | None = typer.Option(None, "--sft-output", help="With --critique: where the SFT "
                                                    "data (revisions) goes (default: OUTPUT stem + .sft.jsonl).")) -> None:
    """Offline batch generation with Ray Data across workers (or self-critique data with --critique)."""
    try:
        if critique is not None:
            from fineray.serve.critique import generate_critique

            stats = generate_critique(critique, model, input, output, sft_output, registry=registry, base=base,
                                      num_workers=num_workers, batch_size=batch_size, use_gpu=use_gpu)
        else:
            from fineray.serve import generate_offline

            stats = generate_offline(model, input, output, registry=registry, base=base, num_workers=num_workers,
                                     max_tokens=max_tokens, temperature=temperature, batch_size=batch_size,
                                     use_gpu=use_gpu)
    except (ValueError, RuntimeError, *user_errors()) as e:
        fail(str(e), 1)
    console.print_json(json.dumps(stats, default=str))


def score(model: str = typer.Option(..., "--model", help="Reward model name[@vN] (trained with objective: reward)."),
          input: Path = typer.Option(..., "--input", help="JSONL: {messages} or {prompt, response} per line."),
          output: Path = typer.Option(..., "--output", help="JSONL to write the lines with `score` to."),
          registry: str = typer.Option("adapters", help="Adapter registry (path or URI)."),
          num_workers: int = typer.Option(1, help="Ray Data workers."), batch_size: int = typer.Option(16),
          use_gpu: bool = typer.Option(False, "--gpu")) -> None:
    """Score conversations with a registered reward model, offline with Ray Data."""
    from fineray.serve.scoring import score_offline

    try:
        stats = score_offline(model, input, output, registry=registry, num_workers=num_workers,
                              batch_size=batch_size, use_gpu=use_gpu)
    except (ValueError, RuntimeError, *user_errors()) as e:
        fail(str(e), 1)
    console.print_json(json.dumps(stats, default=str))
