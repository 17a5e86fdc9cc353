"""`make gpu-check` (benchmarks/gpu_check.py, issue 23) without a GPU: its summary format on synthetic results, its
no-GPU path end to end, the pieces it decides with (build freshness, the pytest plugin's selection and deadline,
the kernel grouping beside the floors), and the timing rule it and `lgm bench` rely on (lgm_lab.timing.measure)."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import cuda_floors  # noqa: E402
import gpu_check  # noqa: E402
import gpu_check_bench  # noqa: E402

from lgm_lab.timing import measure  # noqa: E402


def _synthetic_results():
    return {
        "schema": 1, "budget_s": 450, "seconds": 431.0,
        "machine": {"gpu": "NVIDIA H200", "capability": [9, 0], "driver": "570.86", "torch": "2.11.0",
                    "cuda": "13.0", "python": "3.12.3", "cores": 16, "commit": "abc1234", "date": "2026-12-01 10:00 UTC"},
        "build": {"status": "built", "seconds": 88.0, "arch": "9.0", "ninja": False, "cuda_kernels": True,
                  "ptxas_lines": 40, "spill_lines": 0, "message": "build.log"},
        "tests": {
            "cuda": {"status": "ran", "seconds": 120.0, "passed": 310, "failed": 1, "error": 0, "skipped": 4,
                     "not_run": 0, "not_run_ids": [],
                     "failures": [{"id": "tests/test_lgm_ops.py::test_opcheck[cuda-gemm]", "message": "AssertionError: x"}]},
            "rest": {"status": "stopped at the deadline", "seconds": 90.0, "passed": 900, "failed": 0, "error": 0,
                     "skipped": 2, "not_run": 57, "not_run_ids": ["tests/test_train.py::test_a"], "failures": []},
        },
        "bench": {
            "status": "ran", "seconds": 150.0, "skipped": ["PGD step (time)"], "errors": ["kernels K=10: RuntimeError: y"],
            "lgm": [{"k": 10575, "d": 512, "dtype": "bfloat16", "path": "gemm",
                     "times_ms": {"fused": 0.5, "plain_gemm": 2.0, "compiled_gemm": 1.0},
                     "spread": {"fused": 0.02, "plain_gemm": 0.3, "compiled_gemm": 0.01}, "untrusted": ["plain_gemm"],
                     "peak_mib": {"fused": 30.0, "plain_gemm": 90.0}}],
            "tensor_cores": [{"k": 10575, "d": 512, "dtype": "bfloat16", "times_ms": {"float32_gemms": 0.5, "tensor_cores": 1.1},
                              "spread": {"float32_gemms": 0.01, "tensor_cores": 0.02}, "untrusted": []}],
            "pgd_markdown": "| case | plain torch ms |",
            "kernels": [{"case": "N=256 K=10575 D=512 float32", "steps": 3, "unmatched": ["mystery"],
                         "rows": [{"name": "gemm_rows (logits, margin, lse, loss)", "measured_us": 13.0, "floor_us": 6.5,
                                   "bound": "B", "kernels": ["gemm_rows_kernel"]},
                                  {"name": "other", "measured_us": 2.0, "floor_us": None, "bound": "", "kernels": ["mystery"]}]}],
        },
        "not_run": ["57 of the rest tests (the first: tests/test_train.py::test_a)", "benchmark PGD step (time)"],
        "exit_code": 1,
    }


def test_summary_of_synthetic_results(tmp_path):
    res = _synthetic_results()
    md_path, json_path = gpu_check.write_outputs(res, tmp_path / "out")
    md = md_path.read_text()
    assert json.loads(json_path.read_text()) == res
    assert "NVIDIA H200 (sm_90), driver 570.86; torch 2.11.0 (CUDA 13.0)" in md and "commit abc1234" in md
    assert "431 s of a 450 s budget" in md
    assert gpu_check.NO_GPU not in md
    assert "built (88 s; arch 9.0; ninja: no (serial build); CUDA kernels: yes; ptxas: 40 kernels, 0 with spills)" in md
    assert "| cuda | ran | 310 | 1 | 0 | 4 | 0 | 120 |" in md
    assert "| rest | stopped at the deadline | 900 | 0 | 0 | 2 | 57 | 90 |" in md
    assert "- FAILED (cuda) `tests/test_lgm_ops.py::test_opcheck[cuda-gemm]`: AssertionError: x" in md
    assert "| 10575 | 512 | bfloat16 | gemm | 0.500 ±2% | 2.000 ±30% (!) | 1.000 ±1% | 4.00x | 2.00x | 30.0 | 90.0 | - |" in md
    assert "| 10575 | 512 | bfloat16 | 0.500 ±1% | 1.100 ±2% | 2.20 |" in md
    assert "| gemm_rows (logits, margin, lse, loss) | 13.0 | 6.5 (B) | 2.0x |" in md and "| other | 2.0 | - | - |" in md
    assert "- ERROR kernels K=10: RuntimeError: y" in md
    assert md.index("## Did not run") > md.index("## Benchmarks") and "- benchmark PGD step (time)" in md


def test_summary_without_gpu_says_so():
    res = {"budget_s": 120, "seconds": 4.0, "machine": {"gpu": None, "capability": None},
           "build": {"status": "up to date", "message": "fresh", "cuda_kernels": False}, "tests": {},
           "not_run": ["CUDA tests and GPU benchmarks: no GPU"]}
    md = gpu_check.summary_markdown(res)
    assert f"**{gpu_check.NO_GPU}.**" in md and "## Tests" not in md and "## Benchmarks" not in md
    assert "up to date" in md and "CUDA kernels: no" in md


def test_no_gpu_path_end_to_end(tmp_path):
    """What CI runs (with --build auto there): no GPU -> the message, the summary, exit 0."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--out", str(tmp_path), "--seconds", "60",
                        "--build", "never", "--commit", "test"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert gpu_check.NO_GPU in r.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["machine"]["gpu"] is None and res["exit_code"] == 0 and res["build"]["status"] == "skipped"
    assert res["not_run"] == ["CUDA tests and GPU benchmarks: no GPU"]
    assert gpu_check.NO_GPU in (tmp_path / "summary.md").read_text()


def test_build_settings_for_the_gpu_present():
    assert gpu_check.arch_list((9, 0)) == "9.0" and gpu_check.arch_list([8, 6]) == "8.6"
    env = gpu_check.build_env((9, 0), 16)
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["MAX_JOBS"] == "16" and "LGM_EXT_CPU_ONLY" not in env


def test_build_freshness(tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "lgm_ext").mkdir()
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "csrc" / "a.cpp").write_text("")
    fresh, why, _ = gpu_check.build_is_fresh(False, sys.executable, tmp_path)
    assert not fresh and "no lgm_ext/_C library" in why
    lib = tmp_path / "lgm_ext" / ("_C" + __import__("sysconfig").get_config_var("EXT_SUFFIX"))
    lib.write_text("not a library")
    old = time.time() - 100
    os.utime(lib, (old, old))
    assert gpu_check.build_is_fresh(False, sys.executable, tmp_path)[:2] == (False, "sources changed since the last build")
    os.utime(lib, None)
    # the executor's test module is part of the build: the cuda-emulated tests need it
    assert gpu_check.build_is_fresh(False, sys.executable, tmp_path)[:2] == (False, "no up-to-date lgm_ext/_simt test module")
    (tmp_path / "lgm_ext" / ("_simt" + __import__("sysconfig").get_config_var("EXT_SUFFIX"))).write_text("")
    fresh, why, found = gpu_check.build_is_fresh(False, sys.executable, tmp_path)
    assert found["loads"] is False
    assert not fresh and why.startswith("the library does not load")


def _run_plugin(tmp_path, part, deadline):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("device", ["cpu", "cuda-emulated", "cuda"])
        def test_op(device):
            assert device != "cuda-emulated"

        @pytest.mark.parametrize("backend", ["cuda"])
        def test_own(backend):
            pass

        def test_plain():
            pytest.skip("nothing here")
    """))
    log = tmp_path / f"{part}.jsonl"
    env = dict(os.environ, PYTHONPATH=str(BENCH))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpu_check_pytest", "-p", "no:cacheprovider",
                    "--rootdir", str(tmp_path), "-c", os.devnull, "--gpu-check-part", part, "--gpu-check-deadline",
                    str(deadline), "--gpu-check-log", str(log), str(tmp_path / "test_sample.py")],
                   env=env, capture_output=True, text=True, timeout=120)
    return gpu_check.parse_test_log(log)


def test_pytest_plugin_selects_parts_and_stops_at_the_deadline(tmp_path):
    cuda = _run_plugin(tmp_path, "cuda", 0)
    assert (cuda["collected"], cuda["passed"], cuda["not_run"]) == (2, 2, 0)
    rest = _run_plugin(tmp_path, "rest", 0)
    assert (rest["collected"], rest["passed"], rest["failed"], rest["skipped"]) == (3, 1, 1, 1)
    assert rest["failures"][0]["id"].endswith("test_op[cuda-emulated]") and "AssertionError" in rest["failures"][0]["message"]
    late = _run_plugin(tmp_path, "all", time.time() - 1)
    assert (late["collected"], late["passed"], late["not_run"]) == (5, 0, 5) and late["stopped"]


def test_missing_pytest_degrades_clearly(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None if name == "pytest" else real(name))
    t = gpu_check.run_tests("cuda", time.time() + 10, tmp_path, sys.executable)
    assert t["status"] == "pytest missing" and "not installed" in t["message"]
    md = gpu_check.summary_markdown({"machine": {"gpu": "G"}, "build": {}, "tests": {"cuda": t}, "not_run": []})
    assert "| cuda | pytest missing |" in md


def test_kernels_grouped_beside_their_floors():
    floors = cuda_floors.kernels(256, 10575, 512, "bf16")
    measured = {"void lgm_ext::(anonymous namespace)::gemm_rows_kernel<float>(lgm_ext::RowArgs<float, lgm_ext::RawPtrs>)": 30.0,
                "void lgm_ext::(anonymous namespace)::gemm_class_kernel<float>(lgm_ext::GemmClassArgs<float, lgm_ext::RawPtrs>)": 60.0,
                "void lgm_ext::(anonymous namespace)::column_sums_kernel<float>(...)": 15.0,
                "sm90_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize128x128x32": 600.0,
                "void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>": 90.0,
                "void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>": 3.0}
    rows, unmatched = gpu_check_bench.group_kernels(measured, 3, floors)
    by = {r["name"]: r for r in rows}
    assert by["gemm_rows (logits, margin, lse, loss)"]["measured_us"] == 10.0  # our kernel, not a "gemm"
    assert by["column_sums + gemm_class (dmu, dlog_var)"]["measured_us"] == 25.0
    gemm = by["GEMMs (cuBLAS), all"]
    assert gemm["measured_us"] == 200.0
    assert gemm["floor_us"] == pytest.approx(1e6 * sum(r.floor_s() for r in floors if r.name.startswith("GEMM")))
    assert by["widen inputs / narrow gradients (16-bit storage only)"]["measured_us"] == 30.0
    assert by["other"]["measured_us"] == 1.0 and unmatched == ["void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>"]
    assert by["total"]["measured_us"] == pytest.approx(266.0)


def _clock(values):
    """A fake time_call: each side returns its next scripted value (ms), cycling."""
    state = {}

    def time_call(fn):
        seq = values[fn.__name__]
        i = state.get(fn.__name__, 0)
        state[fn.__name__] = i + 1
        return seq[i % len(seq)]
    return time_call


def _fns(*names):
    out = {}
    for name in names:
        def fn():
            pass
        fn.__name__ = name
        out[name] = fn
    return out


def test_measure_stops_when_the_medians_settle():
    t = measure(_fns("a", "b"), time_call=_clock({"a": [1.0], "b": [2.0, 2.02]}), warmup=1, block_ms=5)
    assert t["a"].median == 1.0 and t["a"].settled and t["a"].trusted() and t["a"].rounds == 3
    assert abs(t["b"].median - 2.01) < 0.011 and t["b"].spread < 0.02 and t["b"].trusted()


def test_measure_flags_a_spread_too_wide_to_trust():
    """The issue's case: one invocation 0.23 ms, another 22.5 ms for the same op -- within one run such noise
    shows as a wide interquartile range, and the side is not to be trusted."""
    t = measure(_fns("fused"), time_call=_clock({"fused": [0.23, 22.5, 0.25, 9.0]}), warmup=1, block_ms=1,
                max_rounds=12, budget_s=60)
    assert t["fused"].spread > 1.0 and not t["fused"].trusted()


def test_measure_respects_its_budget_and_fixed_counts():
    slow = _fns("drift")
    counter = iter(range(10**6))
    t = measure(slow, time_call=lambda fn: 1.0 + next(counter), warmup=1, block_ms=1, budget_s=0.0)
    assert t["drift"].rounds == 1 and not t["drift"].settled and not t["drift"].trusted()
    t = measure(_fns("x"), time_call=_clock({"x": [1.0]}), calls=7, warmup=1)
    assert t["x"].calls == 7 and t["x"].rounds == 5


@pytest.mark.kernels
def test_bench_worker_dry_run_on_the_cpu(tmp_path):
    """The GPU benchmark script, run on the CPU at toy sizes (--quick), writes every section the summary reads
    (the torch.compile side is left out: its compile alone takes a minute here)."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(BENCH)]))
    r = subprocess.run([sys.executable, str(BENCH / "gpu_check_bench.py"), "--deadline", str(time.time() + 600),
                        "--json", str(out), "--device", "cpu", "--cases", "40:300:float32,10:8:bfloat16", "--n", "16",
                        "--quick", "--no-compile"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["errors"] == [] and res["skipped"] == ["the torch.compile side (--no-compile)"]
    assert [(row["k"], row["dtype"], row["path"]) for row in res["lgm"]] == [(40, "float32", "gemm"), (10, "bfloat16", "direct")]
    assert set(res["lgm"][0]["times_ms"]) >= {"fused", "plain_gemm"} and len(res["kernels"]) == 2
    assert [row["k"] for row in res["tensor_cores"]] == [40] and "MNIST" in res["pgd_markdown"]
    md = "\n".join(gpu_check.bench_markdown({**res, "status": "ran", "seconds": 1.0}))
    assert "N = 16" in md and "| 40 | 300 | float32 | gemm |" in md and "| 10 | 8 | bfloat16 | direct |" in md
    assert "### Kernels of one forward+backward, N=16 K=40 D=300 float32" in md
