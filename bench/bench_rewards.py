"""The reward function of bench/preference_throughput.py's GRPO cases, shared by both sides (TRL's reward-function
signature, which fineray's `rl.rewards[].function` also calls). Cheap on purpose: the benchmark times the
machinery, not the reward."""


def sevens(prompts, completions, **kwargs):
    """Share of a completion's word tokens (`t123`) that end in 7."""
    return [sum(w.endswith("7") for w in c.split()) / max(1, len(c.split())) for c in completions]
