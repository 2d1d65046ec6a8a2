"""`fineray data from-feedback`: the request log plus feedback become versioned training data.

From the chat responses logged in the window (`since_s`) and the latest feedback on each (`fineray.serve.
requestlog`):
    train       SFT records `{"messages": [...prompt turns, {"role": "assistant", "content": answer}]}`, the
                answer being the correction when there is one, else the response when rated >= `min_rating`
    preference  `{"prompt": [...prompt turns], "chosen": [{"role": "assistant", ...}], "rejected": [...]}`
                (TRL's conversational preference format): a correction over the response it corrects, and
                for a prompt answered several times a response rated >= `min_rating` over one rated < 0
Prompts are keyed by their logged (redacted) messages; one SFT record per prompt (a correction wins over a
rated answer, newer over older). Responses of `/v1/completions` have no chat turns and are counted as
skipped. The datasets are published with `publish_dataset` (audited, hashed, versioned).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from typing import Any

from fineray.train.datasets import publish_dataset
from fineray.train.registry import AdapterVersion

__all__ = ["build_feedback_dataset", "feedback_records"]


def feedback_records(requests: list[dict[str, Any]], feedback: list[dict[str, Any]], *, min_rating: float = 1.0,
                     since: float | None = None, adapter: str | None = None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """(SFT records, preference records, counts) from log rows (see the module doc)."""
    counts: Counter = Counter()
    latest: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for f in sorted(feedback, key=lambda f: f["created"]):
        latest[f["id"]][f.get("index") or 0] = f  # the newest rating of a response (choice) wins
    by_prompt: dict[str, list[tuple[dict[str, Any], str, dict[str, Any]]]] = defaultdict(list)
    for r in sorted(requests, key=lambda r: r["created"]):
        if (since is not None and r["created"] < since) or (adapter and r["adapter"] != adapter):
            continue
        counts["responses"] += 1
        for idx, f in latest.get(r["id"], {}).items():
            if not r.get("messages"):
                counts["skipped_completions"] += 1
                continue
            choices = r.get("choices") or [r.get("response") or ""]
            answer = choices[idx] if idx < len(choices) else r.get("response") or ""
            by_prompt[r["messages"]].append((f, answer, r))
            counts["rated"] += 1
    sft, pref = [], []
    for key, items in by_prompt.items():
        prompt = json.loads(key)
        best = None
        for f, answer, _ in items:
            if f.get("correction"):
                best = ("correction", f["correction"])
            elif f["rating"] >= min_rating and (best is None or best[0] != "correction"):
                best = ("rated", answer)
        if best is not None:
            sft.append({"messages": [*prompt, {"role": "assistant", "content": best[1]}]})
            counts[f"sft_from_{best[0]}"] += 1
        good = [a for f, a, _ in items if f["rating"] >= min_rating and not f.get("correction")]
        for f, answer, _ in items:
            chosen = f.get("correction") or (good[-1] if f["rating"] < 0 and good else None)
            if chosen and chosen.strip() != answer.strip():
                pref.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                             "rejected": [{"role": "assistant", "content": answer}]})
    counts["sft"], counts["preference"] = len(sft), len(pref)
    return sft, pref, dict(counts)


def build_feedback_dataset(logs: str, registry: str, name: str, *, since_s: float | None = 7 * 86400,
                           min_rating: float = 1.0, adapter: str | None = None,
                           audit: bool = True) -> tuple[AdapterVersion, dict[str, int]]:
    """Read the request log at `logs`, build the SFT and preference splits and publish them as `name@vN`.

    Raises:
        ValueError: nothing to build from (no rated chat responses in the window).
    """
    from fineray.serve.requestlog import FEEDBACK, REQUESTS, read_table
    from fineray.train.audit import AuditSettings, Source
    from fineray.train.audit import audit as run_audit

    since = time.time() - since_s if since_s else None
    sft, pref, counts = feedback_records(read_table(logs, REQUESTS), read_table(logs, FEEDBACK),
                                         min_rating=min_rating, since=since, adapter=adapter)
    if not sft and not pref:
        raise ValueError(f"no feedback to build a dataset from in {logs} (window {since_s or 'all'} s): "
                         f"{counts.get('responses', 0)} responses, {counts.get('rated', 0)} rated")
    splits = {k: v for k, v in (("train", sft), ("preference", pref)) if v}
    fields = {"format": {"train": "chat", "preference": "preference"},
              "sources": {"request_log": logs},
              "lineage": {"from_feedback": logs, "since_s": since_s, "min_rating": min_rating, "adapter": adapter,
                          "counts": counts}}

    def audit_sft(dirs: dict[str, str]) -> dict[str, Any]:  # the SFT split; preference records are pairs
        return run_audit({"train": [Source(dirs["train"], "chat")]} if "train" in dirs else {},
                         AuditSettings(near=False))

    version = publish_dataset(registry, name, splits, fields, audit=audit_sft if audit and sft else None)
    return version, counts
