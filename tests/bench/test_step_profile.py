"""GPU busy time of a profiled step: the union of activity intervals (bench/step_profile.py)."""

from __future__ import annotations

from step_profile import kernel_kind, summarize_intervals


def test_busy_time_is_the_union_of_overlapping_intervals() -> None:
    # Prepare: two overlapping kernels (two streams), one separate, one nested
    iv = [(0, 10, "sm90_xmma_gemm_bf16"), (5, 15, "triton_per_fused_add_0"), (20, 30, "flash_fwd_kernel"),
          (22, 25, "Memcpy DtoD")]

    # Execute
    s = summarize_intervals(iv)

    # Assert: busy = [0, 15] + [20, 30] = 25 ns; per-kind sums count every launch
    assert s["busy_ns"] == 25
    assert s["launches"] == 4
    assert s["kinds"]["gemm"] == [10.0, 1] and s["kinds"]["attention"] == [10.0, 1]
    assert kernel_kind("triton_per_fused_add_0") == "triton"
    assert kernel_kind("Memcpy DtoD") == "copy"
