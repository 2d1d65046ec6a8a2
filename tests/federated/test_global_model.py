"""Adapter plumbing: wire format, residual folding, the exact exported PEFT adapter, rank conversion, hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fineray.federated import global_model as gm
from fineray.federated.silo import FedHooks
from fineray.federated.strategies import fedex_lora
from fineray.federated.wire import WireError, pack_array, pack_tensors, unpack_array, unpack_tensors
from fineray.train.config import load_config


def test_wire_roundtrip_and_rejections():
    # Prepare
    t = {"a.lora_A.weight": torch.randn(2, 3), "a.lora_B.weight": torch.randn(4, 2)}
    # Execute
    back, meta = unpack_tensors(pack_tensors(t, {"num_examples": 7, "metrics": {"train_loss": 1.5}}))
    arr, ameta = unpack_array(pack_array(torch.arange(5).numpy().astype("uint64"), {"round": 3}))
    # Assert
    assert meta == {"num_examples": 7, "metrics": {"train_loss": 1.5}} and ameta == {"round": 3}
    assert all(torch.equal(back[k], t[k]) for k in t) and arr.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(WireError, match="header"):
        unpack_tensors(b"\xff" * 64)
    with pytest.raises(WireError, match="non-float"):
        unpack_tensors(pack_tensors({"x": torch.arange(3)}))


def test_fold_residual_is_exact_and_compressed():
    # Prepare: two rounds of FedEx-LoRA residuals of 3 silos (rank 4 each, 16 stacked columns per round).
    gen = torch.Generator().manual_seed(0)
    ups = [[{"m.lora_A.weight": torch.randn(4, 10, generator=gen), "m.lora_B.weight": torch.randn(6, 4, generator=gen)}
            for _ in range(3)] for _ in range(2)]
    deltas = [fedex_lora.aggregate(u, [1.0, 2.0, 3.0]).base_delta for u in ups]
    # Execute
    res = None
    for d in deltas:
        res = gm.fold_residual(res, d, scaling=2.0)
    # Assert: same dense product, rank at most min(out, in) = 6.
    dense = sum(2.0 * (d["m"][0] @ d["m"][1]) for d in deltas)
    b, a = res["m"]
    torch.testing.assert_close(b @ a, dense, atol=1e-5, rtol=1e-5)
    assert b.shape[1] <= 6
    back = gm.residual_from_tensors(gm.residual_to_tensors(res))
    assert torch.equal(back["m"][0], b) and torch.equal(back["m"][1], a)


def test_rank_conversion_keeps_the_effective_product():
    # Prepare
    gen = torch.Generator().manual_seed(1)
    g = {"m.lora_A.weight": torch.randn(8, 5, generator=gen), "m.lora_B.weight": torch.randn(7, 8, generator=gen)}
    config = {"r": 8, "lora_alpha": 16}
    # Execute
    silo, silo_cfg = gm.to_silo_rank(g, config, 4)
    back = gm.from_silo_rank(silo, config, 8)
    # Assert: s_4 * B4 A4 == s_8 * (first 4 components of B A), and back in global units.
    s4, s8 = gm.lora_scaling(silo_cfg), gm.lora_scaling(config)
    torch.testing.assert_close(s4 * silo["m.lora_B.weight"] @ silo["m.lora_A.weight"],
                               s8 * g["m.lora_B.weight"][:, :4] @ g["m.lora_A.weight"][:4])
    torch.testing.assert_close(back["m.lora_B.weight"], g["m.lora_B.weight"][:, :4])
    assert silo_cfg["r"] == 4 and silo_cfg["lora_alpha"] == 16


def test_exported_adapter_equals_base_plus_residual_plus_adapter(tmp_path: Path):
    # Prepare: a trained-looking tiny adapter and a FedEx-LoRA residual folded into the base.
    cfg = load_config(None, ["model.base=tiny:llama", "lora.r=4", "lora.alpha=8", "lora.dropout=0"])
    adapter, config = gm.initial_adapter(cfg, seed=0)
    gen = torch.Generator().manual_seed(2)
    adapter = {k: (torch.randn(v.shape, generator=gen) * 0.2 if ".lora_B." in k else v) for k, v in adapter.items()}
    silos = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in adapter.items()} for _ in range(3)]
    residual = gm.fold_residual(None, fedex_lora.aggregate(silos, [1.0, 1.0, 2.0]).base_delta,
                                gm.lora_scaling(config))
    exported, ex_cfg = gm.export_peft(adapter, config, residual)
    ids = torch.randint(0, 400, (2, 12), generator=gen)
    # Execute
    _, merged = gm.load_adapter_model(cfg, gm.write_adapter_dir(tmp_path / "g", adapter, config), residual)
    _, served = gm.load_adapter_model(cfg, gm.write_adapter_dir(tmp_path / "x", exported, ex_cfg), None)
    with torch.no_grad():
        want, got = merged(input_ids=ids).logits, served(input_ids=ids).logits
    # Assert: a plain PEFT folder at a higher rank reproduces W0 + R + s B A.
    assert ex_cfg["r"] > config["r"] and gm.lora_scaling(ex_cfg) == pytest.approx(gm.lora_scaling(config))
    assert {p.name for p in (tmp_path / "x").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), merged.disable_adapter():
        residual_only = merged(input_ids=ids).logits
    with torch.no_grad(), served.disable_adapter():
        base_only = served(input_ids=ids).logits
    assert float((want - residual_only).abs().max()) > 1e-3  # the adapter matters ...
    assert float((residual_only - base_only).abs().max()) > 1e-3  # ... and so does the residual


def test_fed_hooks_freeze_a_and_add_the_proximal_gradient():
    # Prepare: a module whose parameter names look like PEFT's.
    class Lora(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.ones(2, 3))})
            self.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.zeros(3, 2))})

    root = torch.nn.Module()
    root.q = Lora()
    FedHooks(proximal_mu=0.5, freeze_lora_a=True).apply(root)
    b = root.q.lora_B["default"]
    # Execute: move away from the round's start, then a loss whose own gradient is zero.
    with torch.no_grad():
        b.add_(2.0)
    (0.0 * b.sum()).backward()
    # Assert: grad = mu * (w - w_global) = 0.5 * 2; A no longer trains.
    assert not root.q.lora_A["default"].requires_grad
    torch.testing.assert_close(b.grad, torch.full((3, 2), 1.0))
