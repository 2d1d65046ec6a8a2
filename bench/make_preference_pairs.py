"""Generate the preference pairs of the quickstart domain: for every support ticket, the correct JSON answer
(chosen) over a corrupted one (rejected): a wrong urgency, issue, product or order number, a missing field,
broken JSON, or prose around the JSON.

Deterministic (seeded) and derived from the shipped tickets; re-running rewrites the files byte for byte.
Usage: python bench/make_preference_pairs.py [OUT_DIR]  (default: fineray/train/builtin_data)
"""

import json
import random
import sys
from pathlib import Path

ISSUES = ["damaged", "late", "wrong_item", "refund", "defective"]
URGENCY = ["low", "normal", "high"]
PRODUCTS = ["AeroBlender", "NovaPhone X2", "ZenKettle", "PixelFrame", "TrailBike 500", "SoundPod Mini",
            "HomeHub", "LumaLamp", "FlexDesk", "AquaBottle", "CloudCam", "SwiftCharger"]
SPLITS = {"train": ("support_tickets_train.jsonl", 600), "val": ("support_tickets_val.jsonl", 100),
          "test": ("support_tickets_test.jsonl", 100)}


def _other(rng: random.Random, values: list[str], current: str) -> str:
    return rng.choice([v for v in values if v != current])


def corrupt(answer: str, rng: random.Random) -> tuple[str, str]:
    """A plausible wrong answer and the kind of corruption."""
    obj = json.loads(answer)
    kind = rng.choice(["urgency", "issue", "product", "order_id", "missing_field", "broken_json", "prose"])
    if kind == "urgency":
        obj["urgency"] = _other(rng, URGENCY, obj["urgency"])
    elif kind == "issue":
        obj["issue"] = _other(rng, ISSUES, obj["issue"])
    elif kind == "product":
        obj["product"] = _other(rng, PRODUCTS, obj["product"])
    elif kind == "order_id":
        i = rng.randrange(len(obj["order_id"]))
        digit = str((int(obj["order_id"][i]) + rng.randint(1, 9)) % 10)
        obj["order_id"] = obj["order_id"][:i] + digit + obj["order_id"][i + 1:]
    elif kind == "missing_field":
        del obj[rng.choice(["product", "order_id", "issue", "urgency"])]
    elif kind == "broken_json":
        return answer.rstrip("}").replace('"', "'", 2), kind
    else:
        return f"Sure! Here is the extracted ticket: {answer} Let me know if you need anything else.", kind
    return json.dumps(obj), kind


def pair(ticket: dict, rng: random.Random) -> dict:
    rejected, kind = corrupt(ticket["output"], rng)
    prompt = [{"role": "system", "content": ticket["system"]},
              {"role": "user", "content": f"{ticket['instruction']}\n\n{ticket['input']}"}]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": ticket["output"]}],
            "rejected": [{"role": "assistant", "content": rejected}], "corruption": kind}


def main(out: Path) -> None:
    rng = random.Random(20261203)
    src = Path(__file__).resolve().parents[1] / "fineray/train/builtin_data"
    out.mkdir(parents=True, exist_ok=True)
    for split, (name, n) in SPLITS.items():
        tickets = [json.loads(x) for x in (src / name).read_text().splitlines() if x.strip()][:n]
        rows = [pair(t, rng) for t in tickets]
        path = out / f"support_pairs_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} pairs to {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "fineray/train/builtin_data")
