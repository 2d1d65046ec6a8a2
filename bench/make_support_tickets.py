"""Generate the quickstart dataset: support tickets -> JSON with fixed fields.

Deterministic (seeded); re-running rewrites the shipped files byte for byte.
Usage: python bench/make_support_tickets.py [OUT_DIR]  (default: fineray/train/builtin_data)
"""

import json
import random
import sys
from pathlib import Path

PRODUCTS = ["AeroBlender", "NovaPhone X2", "ZenKettle", "PixelFrame", "TrailBike 500", "SoundPod Mini",
            "HomeHub", "LumaLamp", "FlexDesk", "AquaBottle", "CloudCam", "SwiftCharger"]
NAMES = ["Maria", "John", "Aisha", "Chen", "Lukas", "Priya", "Omar", "Sofia", "Ken", "Fatima", "Diego", "Anna"]
ISSUES = {
    "damaged": ["arrived broken", "came with a cracked case", "was smashed in the box", "has a dent and won't turn on"],
    "late": ["still hasn't arrived", "is two weeks late", "shows no tracking updates", "never showed up"],
    "wrong_item": ["is not what I ordered", "came in the wrong colour", "was swapped for another product",
                   "arrived as a different model"],
    "refund": ["needs to be refunded", "should be returned for my money back", "- I want a refund",
               "must be cancelled and refunded"],
    "defective": ["stops working after a few minutes", "keeps restarting", "makes a loud buzzing noise",
                  "won't charge anymore"],
}
URGENCY = {
    "high": ["This is urgent!", "Please fix this ASAP.", "I need this solved today.", "URGENT, please help."],
    "normal": ["Please look into it.", "Can you help?", "Let me know what to do.", "Thanks for checking."],
    "low": ["No rush, whenever you can.", "Not urgent at all.", "Take your time.", "Low priority, just FYI."],
}
OPENERS = ["Hi,", "Hello support,", "Dear team,", "Hey there,", "Good morning,"]
SYSTEM = "You are a support triage assistant. Reply with JSON only."
INSTRUCTION = ("Extract the ticket fields as JSON with keys product, order_id, issue "
               "(damaged|late|wrong_item|refund|defective), urgency (low|normal|high).")


def make(rng: random.Random) -> dict:
    product, name = rng.choice(PRODUCTS), rng.choice(NAMES)
    issue = rng.choice(sorted(ISSUES))
    urgency = rng.choice(sorted(URGENCY))
    order = str(rng.randint(10000, 99999))
    parts = [rng.choice(OPENERS), f"my {product} (order #{order}) {rng.choice(ISSUES[issue])}.",
             rng.choice(URGENCY[urgency]), f"- {name}"]
    if rng.random() < 0.5:
        parts[1] = f"order {order}: the {product} I bought {rng.choice(ISSUES[issue])}."
    ticket = " ".join(parts)
    answer = json.dumps({"product": product, "order_id": order, "issue": issue, "urgency": urgency})
    return {"instruction": INSTRUCTION, "input": ticket, "output": answer, "system": SYSTEM}


def main(out: Path) -> None:
    rng = random.Random(20261130)
    rows = [make(rng) for _ in range(1100)]
    out.mkdir(parents=True, exist_ok=True)
    splits = {"support_tickets_train.jsonl": rows[:900], "support_tickets_val.jsonl": rows[900:1000],
              "support_tickets_test.jsonl": rows[1000:]}
    for name, part in splits.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"wrote {len(part)} rows to {out / name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "fineray/train/builtin_data")
