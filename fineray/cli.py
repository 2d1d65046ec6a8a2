"""The `fineray` command line: parse, load the config, call a component. Components are imported lazily so
`fineray --help` and config errors are instant."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune LLMs on Ray: train, tune, federated, serve, submit.")
adapters_app = typer.Typer(no_args_is_help=True, help="List, show and remove registered adapters.")
jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster (Ray Jobs API).")
k8s_app = typer.Typer(no_args_is_help=True, help="KubeRay manifests.")
federated_app = typer.Typer(help="Federated LoRA fine-tuning across data silos.", invoke_without_command=True)
app.add_typer(adapters_app, name="adapters")
app.add_typer(jobs_app, name="jobs")
app.add_typer(k8s_app, name="k8s")
app.add_typer(federated_app, name="federated")

console = Console()
err = Console(stderr=True)

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def _fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def _load(config: Optional[Path], overrides: list[str]) -> Any:
    from fineray.train.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e))


def _user_errors() -> tuple[type[BaseException], ...]:
    from fineray.train.config import ConfigError
    from fineray.train.data import DataError
    from fineray.train.model import ModelError
    from fineray.train.registry import RegistryError

    return (ConfigError, DataError, ModelError, RegistryError, FileNotFoundError)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def print_summary(summary: dict[str, Any]) -> None:
    """The final table of a training run: training numbers, then base vs tuned metrics."""
    t = Table(title=f"run {summary.get('name')}", show_header=False)
    for k in ("steps", "wall_s", "tokens_per_s", "train_loss_first", "train_loss_last", "val_loss",
              "trainable_params", "stop_reason", "registry_ref", "run_dir"):
        if k in summary:
            t.add_row(k, _fmt(summary[k]))
    console.print(t)
    base, tuned = summary.get("base_metrics"), summary.get("tuned_metrics")
    if base:
        m = Table(title="held-out evaluation")
        m.add_column("metric")
        m.add_column("base")
        m.add_column("tuned")
        for k, v in base.items():
            if isinstance(v, (int, float)) and k not in ("n", "eval_s"):
                m.add_row(k, _fmt(v), _fmt((tuned or {}).get(k)))
        console.print(m)
    for d in summary.get("diagnostics") or []:
        console.print(f"[yellow]diagnostic ({d['kind']}):[/] {d['message']}")


@app.command()
def train(config: Optional[Path] = typer.Argument(None, help="Run config YAML (default: the quickstart)."),
          overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.lr=1e-4"),
          no_eval: bool = typer.Option(False, "--no-eval", help="Skip the base-vs-tuned evaluation."),
          no_progress: bool = typer.Option(False, "--no-progress", help="No live progress bar."),
          json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary here.")) -> None:
    """Fine-tune a model on Ray Train (LoRA, DoRA, QLoRA or full)."""
    overrides = list(overrides or [])
    if config is not None and "=" in str(config):  # `fineray train key=value` with no config file
        overrides.insert(0, str(config))
        config = None
    if config is None and QUICKSTART.exists():
        config = QUICKSTART
    cfg = _load(config, overrides)
    from fineray.train.launcher import TrainingError, run_train

    try:
        summary = run_train(cfg, progress=not no_progress, evaluate=False if no_eval else None)
    except (TrainingError, *_user_errors()) as e:
        _fail(str(e), 1)
    print_summary(summary)
    if json_out:
        json_out.write_text(json.dumps(summary, indent=2, default=str))


@app.command("eval")
def eval_cmd(config: Optional[Path] = typer.Argument(None, help="Run config YAML (model, data, eval sections)."),
             overrides: Optional[list[str]] = typer.Argument(None),
             adapter: Optional[str] = typer.Option(None, help="Registry reference (name, name@vN) or folder."),
             data: Optional[str] = typer.Option(None, help="Held-out data file (default: eval.data).")) -> None:
    """Evaluate base vs fine-tuned on a held-out set (perplexity, EM, ROUGE-L, BLEU, JSON metrics)."""
    cfg = _load(config, list(overrides or []))
    from fineray.train.evaluate import evaluate_run
    from fineray.train.launcher import resolve_adapter

    try:
        if adapter:
            cfg.model.adapter = adapter
        res = evaluate_run(cfg, resolve_adapter(cfg), data=data)
    except _user_errors() as e:
        _fail(str(e), 1)
    print_summary({"name": "eval", "base_metrics": res["base"], "tuned_metrics": res.get("tuned")})
    console.print_json(json.dumps(res, default=str))


@app.command()
def export(adapter: str = typer.Argument(..., help="Registry reference (name, name@vN) or adapter folder."),
           out: Path = typer.Argument(..., help="Output folder for the merged safetensors model."),
           registry: str = typer.Option("adapters", help="Adapter registry (path or URI)."),
           base: Optional[str] = typer.Option(None, help="Base model (default: the adapter's manifest).")) -> None:
    """Merge an adapter into its base model and write a standalone safetensors model folder."""
    from fineray.train.export import merge_adapter

    try:
        path = merge_adapter(adapter, out, registry=registry, base=base)
    except _user_errors() as e:
        _fail(str(e), 1)
    console.print(f"merged model written to {path}")


@app.command()
def plan(config: Path = typer.Argument(...), overrides: Optional[list[str]] = typer.Argument(None),
         gpu_memory_gib: Optional[float] = typer.Option(None, help="Memory per GPU (default: 80)")) -> None:
    """Print the pre-flight checks and memory estimate of a run config."""
    cfg = _load(config, list(overrides or []))
    from fineray.train.preflight import format_plan, plan_run

    plan_ = plan_run(cfg, gpu_memory_gib=gpu_memory_gib)
    console.print(format_plan(plan_))
    if not plan_.ok:
        raise typer.Exit(1)


@app.command()
def tune(config: Optional[Path] = typer.Argument(None, help="Run config YAML with a `tune:` section."),
         overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides"),
         resume: Optional[str] = typer.Option(None, "--resume", help="Continue the interrupted sweep in RUN_DIR."),
         no_progress: bool = typer.Option(False, "--no-progress")) -> None:
    """Hyperparameter sweep: Ray Tune + Optuna (TPE) with ASHA; registers the best adapter."""
    from fineray.tune import SweepError, print_sweep, resume_sweep, run_sweep

    try:
        if resume:
            result = resume_sweep(resume, progress=not no_progress)
        else:
            if config is None:
                _fail("give a config with a `tune:` section (e.g. configs/sweep.yaml), or --resume RUN_DIR")
            result = run_sweep(_load(config, list(overrides or [])), progress=not no_progress)
    except (SweepError, *_user_errors()) as e:
        _fail(str(e), 1)
    print_sweep(result, console)


@app.command()
def serve(registry: Optional[str] = typer.Option(None, help="Adapter registry (path or URI)."),
          base: Optional[str] = typer.Option(None, help="Base model (default: embedded SmolLM2)."),
          config: Optional[Path] = typer.Option(None, "--config", help="Serve config YAML (configs/serve.yaml)."),
          host: Optional[str] = typer.Option(None, help="Bind address (loopback unless API keys are set)."),
          port: Optional[int] = typer.Option(None, help="HTTP port (default 8000)."),
          api_keys_file: Optional[str] = typer.Option(None, help="API keys file (YAML/JSON)."),
          device: Optional[str] = typer.Option(None, help="auto | cpu | cuda")) -> None:
    """Serve registered adapters behind an OpenAI-compatible API on Ray Serve."""
    from fineray.serve import load_serve_config
    from fineray.serve.server import run_server
    from fineray.train.config import ConfigError

    try:
        cfg = load_serve_config(config, {"registry": registry, "base": base, "host": host, "port": port,
                                         "api_keys_file": api_keys_file, "device": device})
        run_server(cfg, blocking=True)
    except (ConfigError, RuntimeError) as e:
        _fail(str(e), 1)


@app.command()
def generate(model: Optional[str] = typer.Option(None, "--model", help="Adapter name[@vN] (default: the base)."),
             input: Path = typer.Option(..., "--input", help="JSONL of prompts ({prompt} or {messages})."),
             output: Path = typer.Option(..., "--output", help="JSONL to write completions to."),
             registry: str = typer.Option("adapters", help="Adapter registry (path or URI)."),
             base: Optional[str] = typer.Option(None, help="Base model (default: the adapter's manifest)."),
             num_workers: int = typer.Option(2, help="Ray Data workers."),
             max_tokens: int = typer.Option(256), temperature: float = typer.Option(0.0),
             batch_size: int = typer.Option(16), use_gpu: bool = typer.Option(False, "--gpu")) -> None:
    """Offline batch generation with Ray Data across workers."""
    from fineray.serve import generate_offline

    try:
        stats = generate_offline(model, input, output, registry=registry, base=base, num_workers=num_workers,
                                 max_tokens=max_tokens, temperature=temperature, batch_size=batch_size,
                                 use_gpu=use_gpu)
    except (ValueError, RuntimeError, *_user_errors()) as e:
        _fail(str(e), 1)
    console.print_json(json.dumps(stats, default=str))


@federated_app.callback()
def federated(ctx: typer.Context) -> None:
    """`fineray federated CONFIG [key=value ...]` simulates the federation on one Ray cluster;
    `coordinator` and `silo` run it across organisations over HTTPS."""


@federated_app.command("run", hidden=True)
def federated_run(config: Path = typer.Argument(...), overrides: Optional[list[str]] = typer.Argument(None),
                  no_progress: bool = typer.Option(False, "--no-progress")) -> None:
    """Simulate a federation: every silo a Ray actor on one cluster."""
    cfg = _load(config, list(overrides or []))
    from fineray.federated import print_federation, run_simulation

    try:
        result = run_simulation(cfg, progress=not no_progress, console=console)
    except (ValueError, RuntimeError, *_user_errors()) as e:
        _fail(str(e), 1)
    print_federation(result, console)


@federated_app.command("coordinator")
def federated_coordinator(config: Path = typer.Argument(...), overrides: Optional[list[str]] = typer.Argument(None),
                          host: str = typer.Option("0.0.0.0"), port: int = typer.Option(8443),
                          cert: Optional[str] = typer.Option(None, help="Server certificate (PEM)."),
                          key: Optional[str] = typer.Option(None, help="Server private key (PEM)."),
                          ca: Optional[str] = typer.Option(None, help="CA of the silos' client certs (mutual TLS)."),
                          tokens: Optional[Path] = typer.Option(None, help="YAML/JSON {silo: token} file.")) -> None:
    """Run the aggregator: silos connect over HTTPS; only adapter tensors (safetensors) travel."""
    cfg = _load(config, list(overrides or []))
    from fineray.federated import print_federation, run_coordinator
    from fineray.federated.server import load_tokens

    try:
        tok = load_tokens(str(tokens)) if tokens else None
        result = run_coordinator(cfg, host, port, cert, key, ca, tok, console=console)
    except (ValueError, RuntimeError, *_user_errors()) as e:
        _fail(str(e), 1)
    if result is not None:
        print_federation(result, console)


@federated_app.command("silo")
def federated_silo(coordinator: str = typer.Option(..., help="https://HOST:PORT of the coordinator."),
                   name: str = typer.Option(..., help="This silo's name."),
                   data: str = typer.Option(..., help="Private training data (never leaves this machine)."),
                   token: Optional[str] = typer.Option(None, envvar="FINERAY_SILO_TOKEN"),
                   ca: Optional[str] = typer.Option(None), cert: Optional[str] = typer.Option(None),
                   key: Optional[str] = typer.Option(None),
                   trainer: str = typer.Option("ray", help="ray (Ray Train) | local"),
                   overrides: Optional[list[str]] = typer.Argument(None)) -> None:
    """Run one organisation's silo: trains locally, sends only its adapter update."""
    from fineray.federated import run_silo

    try:
        out = run_silo(coordinator, name, data, token, ca=ca, cert=cert, key=key, trainer=trainer,
                       overrides=list(overrides or []))
    except (ValueError, RuntimeError, TimeoutError, PermissionError, *_user_errors()) as e:
        _fail(str(e), 1)  # PermissionError: SiloAuthError, the coordinator refused the token or certificate
    console.print_json(json.dumps(out, default=str))


@federated_app.command("certs")
def federated_certs(out_dir: Path = typer.Argument(..., help="Folder for the CA, server and silo certificates."),
                    silo: list[str] = typer.Option(..., "--silo", help="Silo name (repeatable)."),
                    host: Optional[list[str]] = typer.Option(None, "--host", help="Coordinator host names/IPs.")) -> None:
    """Generate a CA, a coordinator certificate and one client certificate per silo (for trials and tests)."""
    from fineray.federated import generate_pki

    files = generate_pki(out_dir, silo, hosts=tuple(host or ("127.0.0.1", "localhost")))
    for who, (cert, key) in files.items():
        console.print(f"{who}: {cert} {key}", highlight=False)


# ---------------------------------------------------------------------------------------------- adapters
def _registry(registry: str) -> Any:
    from fineray.train.registry import AdapterRegistry

    return AdapterRegistry(registry)


@adapters_app.command("list")
def adapters_list(registry: str = typer.Option("adapters", help="Adapter registry (path or URI).")) -> None:
    """Every adapter version in the registry."""
    t = Table(title=f"adapters in {registry}")
    for col in ("adapter", "base", "method", "created", "val_loss", "key metric"):
        t.add_column(col)
    for v in _registry(registry).list():
        m = v.manifest.get("metrics", {})
        key = next((f"{k}={_fmt(m[k])}" for k in ("field_accuracy", "exact_match", "rouge_l") if k in m), "")
        t.add_row(v.ref, v.manifest.get("base_model", ""), v.manifest.get("method", ""),
                  v.manifest.get("created", ""), _fmt(m.get("val_loss")), key)
    console.print(t)


@adapters_app.command("show")
def adapters_show(ref: str, registry: str = typer.Option("adapters")) -> None:
    """The manifest of an adapter version (`name` = latest, or `name@vN`)."""
    from fineray.train.registry import RegistryError

    try:
        v = _registry(registry).get(ref)
    except RegistryError as e:
        _fail(str(e), 1)
    console.print_json(json.dumps({"ref": v.ref, "uri": v.uri, **v.manifest}))


@adapters_app.command("rm")
def adapters_rm(ref: str, registry: str = typer.Option("adapters"),
                yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask.")) -> None:
    """Remove an adapter version (`name@vN`) or all its versions (`name`)."""
    from fineray.train.registry import RegistryError

    reg = _registry(registry)
    try:
        if not yes and not typer.confirm(f"remove {ref} from {registry}?"):
            raise typer.Exit(1)
        removed = reg.remove(ref)
    except RegistryError as e:
        _fail(str(e), 1)
    console.print("removed " + ", ".join(v.ref for v in removed))


# ---------------------------------------------------------------------------------------------- submit / jobs
# Draft for fineray/cli.py (uses the module's app, jobs_app, console, err, _fail, _load, _fmt).
_ADDRESS_HELP = "Ray dashboard URL, e.g. http://ray-head:8265 (default: $RAY_ADDRESS)."
_TOKEN_HELP = "Ray auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."


def _env_pairs(items: Optional[list[str]]) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            _fail(f"--env {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out


@app.command()
def submit(config: Path = typer.Argument(..., help="Run config YAML."),
           overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.lr=1e-4"),
           address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
           kind: str = typer.Option("train", "--kind", help="train | tune | federated"),
           wait: bool = typer.Option(False, "--wait", help="Follow the logs; exit with the job's status."),
           storage: Optional[str] = typer.Option(None, "--storage",
                                                 help="Base for relative output.dir/output.registry (s3://..., gs://..., shared path)."),
           ship_code: bool = typer.Option(True, "--ship-code/--no-ship-code",
                                          help="Ship this fineray package with the job (off: use the cluster's)."),
           ship_data: Optional[bool] = typer.Option(None, "--ship-data/--no-ship-data",
                                                    help="Upload local data files with the job (default: remote clusters only)."),
           env: Optional[list[str]] = typer.Option(None, "--env", help="KEY=VALUE for the job (repeatable)."),
           token: Optional[str] = typer.Option(None, "--token", help=_TOKEN_HELP)) -> None:
    """Submit a fineray run to a Ray cluster (Ray Jobs API)."""
    overrides = list(overrides or [])
    cfg = _load(config, overrides)
    from fineray.cluster.jobs import JobError, submit_run, wait_for_job

    try:
        sub = submit_run(cfg, kind, address, overrides=overrides, ship_code=ship_code, token=token,
                         storage=storage, ship_data=ship_data, env=_env_pairs(env))
    except JobError as e:
        _fail(str(e), 1)
    for note in sub.notes:
        console.print(f"[dim]{note}[/]", highlight=False)
    console.print(f"submitted [bold]{sub.submission_id}[/] to {sub.address}", highlight=False)
    console.print(f"  run dir  {sub.output_dir}/{sub.name}\n  adapter  {sub.registry} (name {sub.name})",
                  highlight=False)
    if not wait:
        console.print(f"  follow   fineray jobs logs {sub.submission_id} --follow --address {sub.address}",
                      highlight=False)
        return
    try:
        code = wait_for_job(sub.address, sub.submission_id, token=token)
    except JobError as e:
        _fail(str(e), 1)
    raise typer.Exit(code)


@jobs_app.command("list")
def jobs_list(address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
              all_jobs: bool = typer.Option(False, "--all", help="Also jobs not submitted by fineray."),
              token: Optional[str] = typer.Option(None, "--token", help=_TOKEN_HELP)) -> None:
    """Jobs on the cluster, oldest first."""
    from fineray.cluster.jobs import JobError, list_jobs

    try:
        rows = list_jobs(address, token, fineray_only=not all_jobs)
    except JobError as e:
        _fail(str(e), 1)
    t = Table(title="jobs")
    for col in ("submission id", "status", "kind", "name", "user", "started", "duration_s", "exit"):
        t.add_column(col)
    for j in rows:
        t.add_row(j["submission_id"], j["status"], _fmt(j["kind"]), _fmt(j["name"]), _fmt(j["user"]),
                  _fmt(j["start_time"]), _fmt(j["duration_s"]), _fmt(j["exit_code"]))
    console.print(t)


@jobs_app.command("status")
def jobs_status(job: str = typer.Argument(..., help="Submission id."),
                address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
                token: Optional[str] = typer.Option(None, "--token", help=_TOKEN_HELP)) -> None:
    """One job's status, exit code, outputs and metadata (JSON)."""
    from fineray.cluster.jobs import JobError, job_status

    try:
        info = job_status(address, job, token)
    except JobError as e:
        _fail(str(e), 1)
    console.print_json(json.dumps(info, default=str))


@jobs_app.command("logs")
def jobs_logs(job: str = typer.Argument(..., help="Submission id."),
              follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends."),
              address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
              token: Optional[str] = typer.Option(None, "--token", help=_TOKEN_HELP)) -> None:
    """A job's driver logs (stdout/stderr of `fineray <kind>` on the cluster)."""
    from fineray.cluster.jobs import JobError, job_logs

    try:  # plain stdout, not rich: logs contain [brackets] that rich would read as markup
        job_logs(address, job, follow=follow, out=sys.stdout, token=token)
    except JobError as e:
        _fail(str(e), 1)


@jobs_app.command("stop")
def jobs_stop(job: str = typer.Argument(..., help="Submission id."),
              address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
              token: Optional[str] = typer.Option(None, "--token", help=_TOKEN_HELP)) -> None:
    """Stop a running job (SIGTERM, then SIGKILL after Ray's grace period)."""
    from fineray.cluster.jobs import JobError, stop_job

    try:
        status = stop_job(address, job, token=token)
    except JobError as e:
        _fail(str(e), 1)
    console.print(f"job {job}: {status}", highlight=False)
    if status not in ("STOPPED", "SUCCEEDED", "FAILED"):
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------- k8s
@k8s_app.command("render")
def k8s_render(config: Path = typer.Argument(..., help="Run config YAML."),
               overrides: Optional[list[str]] = typer.Argument(None),
               image: str = typer.Option(..., help="Container image, e.g. REGISTRY/fineray:TAG."),
               kind: str = typer.Option("train", help="train | tune | federated"),
               name: Optional[str] = typer.Option(None, help="RayJob name (default from output.name)."),
               namespace: Optional[str] = typer.Option(None),
               storage: str = typer.Option("/mnt/fineray", help="Shared storage mount or URI for outputs.")) -> None:
    """Render a KubeRay RayJob (plus its ConfigMap) for a run config; workers/GPUs/CPUs from `scaling`."""
    cfg = _load(config, list(overrides or []))
    from fineray.cluster.k8s import dump_yaml, render_rayjob, validate_manifest

    try:
        objs = render_rayjob(cfg.to_dict(), kind, image, name=name, storage=storage, namespace=namespace)
    except (ValueError, TypeError) as e:
        _fail(str(e))
    problems = [p for o in objs for p in validate_manifest(o)]
    if problems:
        _fail("rendered manifest does not validate:\n  " + "\n  ".join(problems), 1)
    sys.stdout.write(dump_yaml(objs))


@k8s_app.command("validate")
def k8s_validate(files: list[Path] = typer.Argument(..., help="Manifest YAML files (multi-document allowed).")) -> None:
    """Validate manifests against the KubeRay CRD schemas and core Kubernetes schemas."""
    from fineray.cluster.k8s import load_yaml_documents, validate_manifest

    bad = 0
    for f in files:
        for i, doc in enumerate(load_yaml_documents(f.read_text())):
            for p in validate_manifest(doc):
                bad += 1
                err.print(f"{f}[{i}] {doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {p}")
    if bad:
        raise typer.Exit(1)
    console.print(f"{len(files)} file(s) valid")


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:]
    # `fineray federated CONFIG ...` (simulation) is the `run` subcommand; keep the short form users type.
    if len(argv) >= 2 and argv[0] == "federated" and argv[1] not in ("run", "coordinator", "silo", "certs", "--help",
                                                                     "-h"):
        sys.argv.insert(2, "run")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
