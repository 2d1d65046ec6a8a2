"""Chunked cross-entropy: equals the plain loss and its gradients, never needs the full logits."""

import pytest
import torch

from fineray.train.fused_loss import LossHead, chunked_cross_entropy, default_chunk_tokens


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_equals_plain_loss_and_gradients(chunk, weight_grad):
    torch.manual_seed(chunk)
    n, d, v = 53, 12, 97
    h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, dtype=torch.float64, requires_grad=weight_grad)
    t = torch.randint(0, v, (n,))
    t[::4] = -100
    t[10:20] = -100  # a chunk with no target at all when chunk <= 10
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t, ignore_index=-100)
    out = chunked_cross_entropy(h, w, t, chunk_tokens=chunk)
    wrt = [h, w] if weight_grad else [h]
    g_ref = torch.autograd.grad(ref * 2.5, wrt)  # a non-unit upstream gradient
    g_out = torch.autograd.grad(out * 2.5, wrt)
    assert float(out) == pytest.approx(float(ref), rel=1e-12)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_batched_shapes_and_no_grad():
    torch.manual_seed(0)
    h = torch.randn(2, 9, 8)
    w = torch.randn(30, 8)
    t = torch.randint(0, 30, (2, 9))
    ref = torch.nn.functional.cross_entropy((h @ w.t()).reshape(-1, 30), t.reshape(-1))
    with torch.no_grad():
        assert float(chunked_cross_entropy(h, w, t, 4)) == pytest.approx(float(ref), rel=1e-5)


def test_loss_head_is_the_linear_without_targets_and_the_loss_with():
    lin = torch.nn.Linear(8, 30, bias=False)
    head = LossHead(lin, chunk_tokens=4)
    assert head.weight is lin.weight  # same Parameter: tying and state-dict keys are unchanged
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(head(x), lin(x))
    t = torch.randint(0, 30, (2, 5))
    head.set_targets(t)
    loss = head(x)
    ref = torch.nn.functional.cross_entropy(lin(x).reshape(-1, 30), t.reshape(-1))
    assert loss.ndim == 0 and float(loss) == pytest.approx(float(ref), rel=1e-5)
    torch.testing.assert_close(head(x), lin(x))  # targets are used once


def test_default_chunk_is_about_a_gibibyte_of_fp32_logits():
    n = default_chunk_tokens(128256)
    assert n == 2048 and n * 128256 * 4 <= 1 << 30
    assert default_chunk_tokens(512) == 1 << 19
