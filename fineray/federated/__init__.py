"""Federated LoRA fine-tuning: aggregation maths, secure aggregation, DP, screening, data splits.

Everything in this package is pure (tensors/arrays in, tensors/arrays out); the Ray orchestration
lives elsewhere. Submodules: :mod:`.strategies`, :mod:`.secagg`, :mod:`.shamir`, :mod:`.dp`,
:mod:`.robust`, :mod:`.split`.
"""
