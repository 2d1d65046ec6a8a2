"""Model resolution and traffic splits: A/B weights over 1,000 users, stickiness, 400/403/404, and adapters
registered after start-up resolving without a restart."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fineray.serve.auth import ANONYMOUS, Principal
from fineray.serve.config import RolloutVariant
from fineray.serve.protocol import APIError
from fineray.serve.router import ModelCatalog, pick_variant
from fineray.train.registry import AdapterRegistry

SPLIT = [RolloutVariant(adapter="alpha@v1", weight=0.9), RolloutVariant(adapter="beta@v1", weight=0.1)]


def test_split_over_1000_users_matches_the_weights_and_is_sticky():
    # Execute
    users = [f"user-{i}" for i in range(1000)]
    first = [pick_variant("support", SPLIT, u) for u in users]
    again = [pick_variant("support", SPLIT, u) for u in reversed(users)][::-1]
    # Assert: binomial sd for p=0.1, n=1000 is 9.5; allow 4 sd
    counts = Counter(first)
    assert abs(counts["beta@v1"] - 100) <= 38 and counts["alpha@v1"] + counts["beta@v1"] == 1000
    assert first == again


def test_split_without_user_is_weighted_random():
    rng = random.Random(0)
    counts = Counter(pick_variant("support", SPLIT, None, rng) for _ in range(2000))
    assert abs(counts["beta@v1"] - 200) <= 54


def test_changing_weights_moves_only_users_across_the_boundary():
    users = [f"user-{i}" for i in range(1000)]
    before = {u: pick_variant("r", SPLIT, u) for u in users}
    after = {u: pick_variant("r", [("alpha@v1", 0.8), ("beta@v1", 0.2)], u) for u in users}
    # every user on beta before stays on beta; about 10 % more move over
    assert all(after[u] == "beta@v1" for u in users if before[u] == "beta@v1")
    assert 50 <= sum(before[u] != after[u] for u in users) <= 150
    assert {pick_variant("r", [("alpha@v1", 1.0), ("beta@v1", 0.0)], u) for u in users} == {"alpha@v1"}


@pytest.fixture
def catalog(make_registry):
    root = make_registry(("alpha", "beta"))
    return ModelCatalog(str(root), "tiny:llama", ttl_s=60, min_refresh_s=0)


def test_resolve_base_adapter_version_and_rollout(catalog):
    rollouts = {"ab": SPLIT}
    assert catalog.resolve("base", ANONYMOUS, rollouts).ref is None
    assert catalog.resolve("tiny:llama", ANONYMOUS, rollouts).model_id == ""
    t = catalog.resolve("alpha", ANONYMOUS, rollouts)
    assert (t.ref, t.name, t.version, t.rollout) == ("alpha@v1", "alpha", 1, None)
    assert catalog.resolve("beta@v1", ANONYMOUS, rollouts).model_id == "beta@v1"
    t = catalog.resolve("ab", ANONYMOUS, rollouts, user="user-7")
    assert t.rollout == "ab" and t.ref == pick_variant("ab", SPLIT, "user-7")


@pytest.mark.parametrize("model, principal, status", [
    ("../../etc/passwd", ANONYMOUS, 400),
    ("alpha@x", ANONYMOUS, 400),
    ("nope", ANONYMOUS, 404),
    ("alpha@v9", ANONYMOUS, 404),
    ("beta", Principal("k", frozenset({"alpha"})), 403),
    ("nope", Principal("k", frozenset({"alpha"})), 403),  # a key never learns what exists beyond its scope
    ("base", Principal("k", frozenset({"alpha"})), 403),
    ("ab", Principal("k", frozenset({"alpha"})), 403),
    ("alpha@v2", Principal("k", frozenset({"alpha"})), 404),
])
def test_resolve_errors(catalog, model, principal, status):
    with pytest.raises(APIError) as e:
        catalog.resolve(model, principal, {"ab": SPLIT})
    assert e.value.status == status and e.value.param == "model"


def test_new_adapter_resolves_at_once_and_foreign_bases_are_not_served(catalog, adapter_dirs):
    # Prepare: the catalog has listed (and cached for 60 s) before the new versions appear
    assert sorted(catalog.adapters()) == ["alpha", "beta"]
    reg = AdapterRegistry(str(catalog.registry.root))
    reg.register("gamma", adapter_dirs["gamma"], base_model="tiny:llama", method="lora")
    reg.register("alpha", adapter_dirs["gamma"], base_model="tiny:llama", method="lora")
    reg.register("other", adapter_dirs["gamma"], base_model="embedded:smollm2-135m-instruct", method="lora")
    # Execute / Assert: unknown names and versions trigger a re-list
    assert catalog.resolve("gamma", ANONYMOUS, {}).ref == "gamma@v1"
    assert catalog.resolve("alpha@v2", ANONYMOUS, {}).ref == "alpha@v2"
    assert catalog.resolve("alpha", ANONYMOUS, {}).ref == "alpha@v2"
    with pytest.raises(APIError) as e:
        catalog.resolve("other", ANONYMOUS, {})
    assert e.value.status == 404


def test_list_models_filters_by_key(catalog):
    rollouts = {"ab": SPLIT, "alpha": SPLIT}  # a rollout may shadow an adapter name; listed once
    ids = [m["id"] for m in catalog.list_models(ANONYMOUS, rollouts)]
    assert ids == ["tiny:llama", "alpha", "beta", "ab"]
    scoped = [m["id"] for m in catalog.list_models(Principal("k", frozenset({"beta", "base"})), rollouts)]
    assert scoped == ["tiny:llama", "beta"]
    alpha = next(m for m in catalog.list_models(ANONYMOUS, {}) if m["id"] == "alpha")
    assert alpha["object"] == "model" and alpha["root"] == "alpha@v1" and alpha["parent"] == "tiny:llama"
