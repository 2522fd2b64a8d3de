"""The OpenBLAS binding: same numbers with and without it, a clear error for a bad library."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import run_cli

_SNIPPET = """
import json, mlx_mtpd
from mlx_mtpd import blas
import mlx.core as mx
a = mx.random.normal((257, 300), key=mx.random.key(0))
b = mx.random.normal((300, 129), key=mx.random.key(1))
c = (a @ b).tolist()
print(json.dumps({"lib": blas.state["library"], "c": c}))
"""


def _run(env):
    r = subprocess.run([sys.executable, "-c", _SNIPPET], capture_output=True, text=True,
                       env={**__import__("os").environ, **env}, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_matmul_agrees_with_and_without_openblas():
    import numpy as np

    with_blas = _run({})
    without = _run({"MLX_MTPD_BLAS": "0"})
    assert without["lib"] is None
    np.testing.assert_allclose(np.array(with_blas["c"]), np.array(without["c"]), rtol=1e-4, atol=1e-4)


def test_doctor_reports_blas_and_speed():
    from mlx_mtpd import blas

    r = run_cli("doctor")
    assert r.returncode == 0, r.stderr
    assert "GFLOP/s" in r.stdout and "BLAS:" in r.stdout
    if blas.find_openblas():
        assert "OpenBLAS" in r.stdout
    r = run_cli("doctor", env={"MLX_MTPD_BLAS": "0"})
    assert "disabled by MLX_MTPD_BLAS=0" in r.stdout


def test_explicit_bad_library_warns_in_one_line_and_falls_back():
    r = run_cli("doctor", env={"MLX_MTPD_BLAS": "/nonexistent/libblas.so"})
    assert r.returncode == 0
    assert r.stderr.strip().count("\n") == 0
    assert "MLX_MTPD_BLAS='/nonexistent/libblas.so' cannot be loaded" in r.stderr
    assert "could not load /nonexistent/libblas.so" in r.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_explicit_library_path_is_used():
    from mlx_mtpd import blas

    lib = blas.find_openblas()
    if lib is None:
        pytest.skip("no system OpenBLAS here")
    assert _run({"MLX_MTPD_BLAS": lib})["lib"] == lib
