"""Correctness checks of the fast path on the device, before timing it (same function, any input).

1. packed rows (varlen / flex / sdpa document masks) vs the padded batch: loss and LoRA gradients;
2. chunked cross-entropy vs the plain loss: value and gradients (hidden states and output weight);
3. imports of the carried packages (bitsandbytes NF4 forward/backward, DeepSpeed, Ray).

Prints one line per check with the relative errors; exits non-zero if a check fails.
Usage: python bench/gpu_checks.py [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_packing(device: str, backends: list[str]) -> bool:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fineray.train.fastpath import FastPath, apply_fast_path, forward_loss, make_batch, to_device
    from fineray.train.templates import Tokenized

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=3000, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    base = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # non-zero B so LoRA gradients flow into A too
    g = torch.Generator().manual_seed(1)
    items = []
    for n in (37, 300, 5, 129, 64):
        ids = torch.randint(3, 3000, (n,), generator=g).tolist()
        items.append(Tokenized(ids, [-100] * 3 + ids[3:]))

    def run(fast: FastPath) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        batch = to_device(make_batch(items, 0, fast), torch.device(device))
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss, _ = forward_loss(model, batch, fast)
        loss.backward()
        return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_g = run(FastPath(pad_multiple=8))
    ok = True
    for att in backends:
        for chunked in (False, True):
            fast = FastPath(packing=True, attention=att, chunked_loss=chunked, chunk_tokens=128, pad_multiple=8)
            try:
                apply_fast_path(model, fast)
                loss, grads = run(fast)
                err = max(rel(grads[k], ref_g[k]) for k in ref_g)
                tol = 2e-2 if device == "cuda" else 1e-5
                good = abs(loss - ref_loss) / abs(ref_loss) < tol / 4 and err < tol and set(grads) == set(ref_g)
                print(f"CHECK packing attention={att} chunked_loss={chunked}: loss {loss:.6f} vs padded "
                      f"{ref_loss:.6f}, max rel grad err {err:.2e} over {len(grads)} tensors -> "
                      f"{'OK' if good else 'FAIL'}", flush=True)
                ok &= good
            except Exception as e:  # noqa: BLE001
                print(f"CHECK packing attention={att} chunked_loss={chunked}: ERROR {type(e).__name__}: {e}",
                      flush=True)
                traceback.print_exc()
                ok = False
            finally:
                base.config._attn_implementation = "sdpa"
    return ok


def check_chunked_ce(device: str) -> bool:
    from fineray.train.fused_loss import chunked_cross_entropy

    ok = True
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        torch.manual_seed(0)
        n, d, v = (3000, 512, 50000) if device == "cuda" else (300, 64, 2000)
        h = (torch.randn(n, d, device=device) * 0.5).to(dtype).requires_grad_()
        w = (torch.randn(v, d, device=device) * 0.05).to(dtype).requires_grad_()
        t = torch.randint(0, v, (n,), device=device)
        t[::7] = -100
        ref = torch.nn.functional.cross_entropy((h.float() @ w.float().t()), t, ignore_index=-100)
        gh, gw = torch.autograd.grad(ref, [h, w])
        out = chunked_cross_entropy(h, w, t, chunk_tokens=1024)
        ch, cw = torch.autograd.grad(out, [h, w])
        e = (abs(float(out) - float(ref)) / float(ref), rel(ch, gh), rel(cw, gw))
        good = max(e) < tol
        print(f"CHECK chunked CE {dtype}: loss rel err {e[0]:.1e}, grad hidden {e[1]:.1e}, grad weight {e[2]:.1e}"
              f" -> {'OK' if good else 'FAIL'}", flush=True)
        ok &= good
    return ok


def check_imports(device: str) -> bool:
    ok = True
    for name in ("ray", "deepspeed", "bitsandbytes", "pydantic"):
        try:
            mod = __import__(name)
            print(f"CHECK import {name} {getattr(mod, '__version__', '?')}: OK", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"CHECK import {name}: ERROR {type(e).__name__}: {e}", flush=True)
            ok = False
    if device == "cuda":
        try:
            import bitsandbytes as bnb

            lin = torch.nn.Linear(256, 512, bias=False, device=device, dtype=torch.bfloat16)
            q = bnb.nn.Linear4bit(256, 512, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4").to(device)
            x = torch.randn(64, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
            y = q(x)
            y.float().pow(2).mean().backward()
            e = rel(y, lin(x))
            good = e < 0.15 and x.grad is not None and torch.isfinite(x.grad).all()
            print(f"CHECK bitsandbytes NF4 forward rel err vs bf16 {e:.3f}, backward ok -> "
                  f"{'OK' if good else 'FAIL'}", flush=True)
            ok &= bool(good)
        except Exception as e:  # noqa: BLE001
            print(f"CHECK bitsandbytes NF4: ERROR {type(e).__name__}: {e}", flush=True)
            ok = False
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    from fineray.train.packing import varlen_available

    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {a.device}, varlen available "
          f"{varlen_available()}", flush=True)
    backends = ["varlen", "flex", "sdpa"] if a.device == "cuda" else ["sdpa"]
    results = [check_chunked_ce(a.device), check_packing(a.device, backends), check_imports(a.device)]
    print("CHECKS " + ("ALL OK" if all(results) else "SOME FAILED"), flush=True)
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
