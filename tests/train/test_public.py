"""`fineray.train`'s public face: the names in `__all__` resolve, lazily (loading a config imports no torch)."""

import subprocess
import sys


def test_public_names_resolve_without_importing_torch_for_configs() -> None:
    # Execute: a fresh interpreter, so nothing else has imported torch yet
    code = ("import sys, fineray.train as t; cfg = t.load_config(None, ['train.lr=0.001']); "
            "assert isinstance(cfg, t.RunConfig) and 'torch' not in sys.modules; "
            "assert all(getattr(t, n) for n in t.__all__); print(sorted(t.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # Assert
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['ConfigError', 'RunConfig', 'TrainingError', 'load_config', 'run_train']"
