"""The README's Python examples in the fast tier (issue 43), so that `make test-reference` -- the fast tier on the
pure-PyTorch path, as a user without a compiler has it -- runs them too: each block verbatim, in a fresh
interpreter that inherits this run's environment (LGM_EXT_DISABLE_KERNELS included)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lgm_ext

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_its_library_example():
    assert BLOCKS and any("PGD" in b and "param_groups" in b and "clip_grad_norm_" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_on_this_path(index, tmp_path):
    r = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{r.stderr[-3000:]}"
    # the path that ran: the pure-PyTorch path says so (once), the fused kernels say nothing
    assert r.stderr.count("lgm_ext runs the pure-PyTorch path") == (0 if lgm_ext.has_fused_kernels() else 1), \
        r.stderr[-3000:]
