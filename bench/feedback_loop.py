"""The production feedback loop, end to end on this machine (CPU):

    1. serve the quickstart adapter (support-json, latest) with the request log on
    2. send batch A of held-out "production" tickets (phrasings the training data never used), rate every
       answer by script against the reference JSON (+1 all fields right, else -1 with the reference as the
       correction) through POST /v1/feedback
    3. fineray data from-feedback -> dataset tickets-feedback@vN (SFT + preference splits)
    4. retrain from the served adapter on the feedback dataset mixed with the original tickets -> support-json@v(N+1)
    5. roll the new version out as a 50/50 A/B (sticky per user) against the old one, send batch B (other
       tickets), and compare field accuracy per variant; the per-variant feedback ratings come from /metrics

Prerequisite: `make demo` (trains support-json@v1 into ./adapters). Run from the repository root:
    python bench/feedback_loop.py [--registry adapters] [--work runs/feedback-loop] [--per-batch 64]
Prints a JSON summary and writes it to WORK/summary.json.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_support_tickets import INSTRUCTION, PRODUCTS, SYSTEM

# Phrasings the quickstart data never uses: production traffic drifted from the training distribution.
DRIFT_ISSUES = {
    "damaged": ["showed up with the screen shattered", "got crushed during shipping", "has a big crack down the side"],
    "late": ["is stuck at the depot for ten days", "missed the promised delivery date", "has been in transit forever"],
    "wrong_item": ["turned out to be someone else's parcel", "is a completely different item",
                   "came as the mini version, not what I paid for"],
    "refund": ["- please send my money back", "should be reimbursed in full", "- I want the charge reversed"],
    "defective": ["overheats and shuts itself off", "flickers constantly", "refuses to pair with anything"],
}
DRIFT_URGENCY = {
    "high": ["My client demo is in an hour!", "Every hour this waits costs us money.", "Escalate immediately."],
    "normal": ["Would appreciate a look.", "Please advise.", "Looking forward to your reply."],
    "low": ["Whenever is convenient.", "Absolutely no hurry here.", "Just letting you know, no action needed soon."],
}


def drift_ticket(rng: random.Random) -> tuple[list[dict[str, str]], dict[str, str]]:
    product, issue, urgency = rng.choice(PRODUCTS), rng.choice(sorted(DRIFT_ISSUES)), rng.choice(sorted(DRIFT_URGENCY))
    order = str(rng.randint(10000, 99999))
    text = f"Hello, my {product} (order #{order}) {rng.choice(DRIFT_ISSUES[issue])}. {rng.choice(DRIFT_URGENCY[urgency])}"
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{INSTRUCTION}\n\n{text}"}]
    return msgs, {"product": product, "order_id": order, "issue": issue, "urgency": urgency}


def field_score(answer: str, ref: dict[str, str]) -> float:
    """Share of the reference fields the answer got right (0 when it is not a JSON object)."""
    try:
        got = json.loads(answer.strip())
    except ValueError:
        return 0.0
    if not isinstance(got, dict):
        return 0.0
    return sum(str(got.get(k)) == v for k, v in ref.items()) / len(ref)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_rate(registry: str, logs: str, model: str, tickets: list, rollouts: dict | None = None) -> dict:
    """Serve, send every ticket (16 at a time), rate each answer through /v1/feedback; per-variant results."""
    from fineray.serve import load_serve_config, run_server

    cfg = load_serve_config(None, {"registry": registry, "port": free_port(), "log_requests": logs,
                                   "log_flush_s": 1.0, "rollouts": rollouts or {}, "num_cpus_per_replica": 2,
                                   "request_timeout_s": 1800,
                                   "ray": {"num_cpus": 2}, "batching": {"max_batch_size": 16}})
    t0 = time.perf_counter()
    handle = run_server(cfg, blocking=False)
    start_s = time.perf_counter() - t0
    client = httpx.Client(base_url=handle.url, timeout=600)

    def one(i: int) -> dict:
        msgs, ref = tickets[i]
        r = client.post("/v1/chat/completions", json={"model": model, "messages": msgs, "max_tokens": 48,
                                                       "temperature": 0, "user": f"user-{i}"}).json()
        answer = r["choices"][0]["message"]["content"]
        score = field_score(answer, ref)
        body = {"id": r["id"], "rating": 1 if score == 1 else -1}
        if score < 1:
            body["correction"] = json.dumps(ref)
        assert client.post("/v1/feedback", json=body).status_code == 200
        return {"variant": r["model"], "score": score}

    # One variant's requests at a time (the rollout still picks each user's variant): with requests for two
    # SmolLM2 adapters in flight at once the engine stalled on this machine (2026-12-03), see bench/RESULTS.md.
    from fineray.serve.router import pick_variant

    groups: dict[str, list[int]] = {}
    for i in range(len(tickets)):
        key = pick_variant(model, [(v["adapter"], v["weight"]) for v in rollouts[model]], f"user-{i}") if rollouts else model
        groups.setdefault(key, []).append(i)
    t1 = time.perf_counter()
    results = []
    with ThreadPoolExecutor(16) as pool:
        for idx in groups.values():
            results += list(pool.map(one, idx))
    gen_s = time.perf_counter() - t1
    time.sleep(1.5)  # the ingress flushes metric events every 0.5 s
    metrics = client.get("/metrics").text
    client.close()
    handle.shutdown()  # flushes the request log
    per = {}
    for r in results:
        per.setdefault(r["variant"], []).append(r["score"])
    return {"server_start_s": round(start_s, 1), "requests_s": round(gen_s, 1),
            "variants": {v: {"n": len(s), "field_accuracy": round(sum(s) / len(s), 4),
                             "all_fields_right": round(sum(x == 1 for x in s) / len(s), 4)} for v, s in per.items()},
            "feedback_metrics": [line for line in metrics.splitlines()
                                 if line.startswith(("fineray_feedback_rating_sum", "fineray_feedback_ratings_total",
                                                     "fineray_feedback_corrections_total"))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", default="adapters")
    ap.add_argument("--adapter", default="support-json")
    ap.add_argument("--work", default="runs/feedback-loop")
    ap.add_argument("--per-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ab-only", metavar="NEW", help="Skip steps 1-4: A/B the served adapter against NEW.")
    args = ap.parse_args()
    from fineray.serve.feedback import build_feedback_dataset
    from fineray.train.config import load_config, validate_config
    from fineray.train.launcher import run_train
    from fineray.train.registry import AdapterRegistry

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    registry = str(Path(args.registry).resolve())
    reg = AdapterRegistry(registry)
    old = reg.get(args.adapter).ref
    rng = random.Random(20261203)
    batch_a = [drift_ticket(rng) for _ in range(args.per_batch)]
    batch_b = [drift_ticket(rng) for _ in range(args.per_batch)]
    summary: dict = {"old": old, "per_batch": args.per_batch}
    t = time.perf_counter()

    if args.ab_only:
        old = reg.get(args.ab_only).manifest["lineage"]["parent"]  # the adapter it was retrained from
        summary.update(old=old, retrain={"new": args.ab_only, "lineage": reg.get(args.ab_only).manifest["lineage"]})
        return _ab(summary, registry, work, old, args.ab_only, batch_b, t)
    # 1-2: serve the current adapter, rate batch A
    summary["batch_a"] = serve_and_rate(registry, str(work / "logs"), old, batch_a)
    print("batch A:", json.dumps(summary["batch_a"]["variants"]), file=sys.stderr, flush=True)
    # 3: the feedback dataset
    version, counts = build_feedback_dataset(str(work / "logs"), registry, "tickets-feedback", since_s=86400)
    summary["feedback_dataset"] = {"ref": f"dataset:{version.ref}", "counts": counts,
                                   "splits": version.manifest["splits"]}
    print("feedback dataset:", json.dumps(summary["feedback_dataset"]), file=sys.stderr, flush=True)
    # 4: retrain from the served adapter on feedback + the original tickets
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", [
        f"model.adapter={old}", f"output.registry={registry}", f"output.dir={work / 'runs'}",
        f"output.name={args.adapter}", f"train.max_steps={args.steps}", "train.lr=5e-4", "train.eval_every=10",
        "eval.enabled=false", "cluster.num_cpus=2",
    ])
    data = cfg.to_dict()
    data["data"]["train"] = [{"path": f"dataset:{version.ref}", "format": "chat", "weight": 1.0},
                             {"path": "fineray:support-tickets", "format": "alpaca", "weight": 1.0}]
    cfg = validate_config(data, "feedback loop")
    t_train = time.perf_counter()
    trained = run_train(cfg, progress=False, evaluate=False)
    new = trained["registry_ref"]
    summary["retrain"] = {"new": new, "steps": trained["steps"], "wall_s": round(time.perf_counter() - t_train, 1),
                          "train_loss_last": trained["train_loss_last"],
                          "lineage": reg.get(new).manifest["lineage"]}
    print("retrained:", json.dumps(summary["retrain"]), file=sys.stderr, flush=True)
    return _ab(summary, registry, work, old, new, batch_b, t)


def _ab(summary: dict, registry: str, work: Path, old: str, new: str, batch_b: list, t: float) -> None:
    """5: 50/50 A/B of old vs new on batch B; writes WORK/summary.json."""
    summary["ab"] = serve_and_rate(registry, str(work / "logs"), "support-json-ab", batch_b, rollouts={
        "support-json-ab": [{"adapter": old, "weight": 0.5}, {"adapter": new, "weight": 0.5}]})
    summary["total_s"] = round(time.perf_counter() - t, 1)
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
