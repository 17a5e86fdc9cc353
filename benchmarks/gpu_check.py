#!/usr/bin/env python
"""``make gpu-check``: a bare GPU machine (a preinstalled torch, no network, no venv) turned into test results and
numbers in one command, within a time budget (issue 23).

    make gpu-check [PYTHON=python3] [GPU_CHECK_SECONDS=450] [GPU_CHECK_OUT=build/gpu-check] [COMMIT=<sha>]
    python benchmarks/gpu_check.py --out build/gpu-check --seconds 450 [--build auto|always|never]

1. Build the extension in place against this Python's torch (``setup.py build_ext --inplace``: no pip, no
   download, nothing installed into the machine's site-packages), for the GPU present (TORCH_CUDA_ARCH_LIST from
   torch.cuda.get_device_capability(), MAX_JOBS = cores).  ``--build auto`` (default) skips it when
   lgm_ext/_C*.so (and the test module lgm_ext/_simt*.so) is newer than every source, loads, and has CUDA
   kernels wherever a GPU is present.
2. Without a GPU: "no GPU: CUDA tests and benchmarks skipped", the summary, exit 0.
3. The tests with a ``cuda`` parameter (gradcheck, float32/bf16 against the reference, opcheck, torch.compile,
   malformed input, mixed devices, the tensor-core GEMMs), stopped cleanly at their deadline.
4. The GPU benchmarks (benchmarks/gpu_check_bench.py, a subprocess): the fused loss against plain PyTorch eager
   and torch.compile at (256, 10, 100), (256, 10575, 512), (256, 100000, 512) in float32 and bfloat16 (CUDA
   events, max_memory_allocated), the fused loss with and without the tensor-core GEMMs, the PGD step, and
   each kernel's time (torch.profiler) beside its floor from benchmarks/cuda_floors.py.
5. The rest of the suite, as time allows.
Each step gets a share of what is left of ``--seconds``; whatever did not run is listed.  summary.md and
results.json in ``--out`` are rewritten after every step, so a run cut short keeps what it measured.
Exit status: 0 when everything that ran passed; 1 when the build, a test or a benchmark failed, or pytest is
missing (the benchmarks still run).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
NO_GPU = "no GPU: CUDA tests and benchmarks skipped"
RESERVE_S = 10.0  # kept back for the summary
GRACE_S = 20.0  # a step still running this long after its deadline is killed


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- build
def arch_list(capability) -> str:
    """TORCH_CUDA_ARCH_LIST for one GPU: its compute capability only (one arch compiles fastest)."""
    return f"{capability[0]}.{capability[1]}"


def build_env(capability, cores: int) -> dict:
    env = dict(os.environ, MAX_JOBS=str(max(1, cores)), LGM_EXT_REQUIRE_BUILD="1")  # a failed compile is a failure
    env.pop("LGM_EXT_CPU_ONLY", None)
    env.pop("LGM_EXT_NO_BUILD", None)
    if capability is not None:
        env["TORCH_CUDA_ARCH_LIST"] = arch_list(capability)
    return env


def sources(root: Path = ROOT) -> list:
    return [root / "setup.py"] + [Path(p) for p in glob.glob(str(root / "csrc" / "**" / "*"), recursive=True)
                                  if Path(p).is_file()]


def built_library(root: Path = ROOT) -> Path | None:
    path = root / "lgm_ext" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    return path if path.exists() else None


def probe(python: str, root: Path = ROOT) -> dict:
    """What the in-place build gives this Python: loads? CUDA kernels? (a subprocess: a stale library must not
    be loaded into the driver)."""
    code = "import json, lgm_ext; print(json.dumps({'cuda_kernels': lgm_ext.has_cuda_kernels()}))"
    r = subprocess.run([python, "-c", code], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                       capture_output=True, text=True)
    if r.returncode != 0:
        return {"loads": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return {"loads": True, **json.loads(r.stdout.strip().splitlines()[-1])}


def build_is_fresh(gpu: bool, python: str, root: Path = ROOT) -> tuple:
    """(fresh, why, what probe() found -- empty when it did not get that far)."""
    lib = built_library(root)
    if lib is None:
        return False, "no lgm_ext/_C library for this Python", {}
    newest = max(p.stat().st_mtime for p in sources(root))
    if lib.stat().st_mtime < newest:
        return False, "sources changed since the last build", {}
    simt = root / "lgm_ext" / ("_simt" + sysconfig.get_config_var("EXT_SUFFIX"))  # the executor's test module
    if not simt.exists() or simt.stat().st_mtime < newest:
        return False, "no up-to-date lgm_ext/_simt test module", {}
    p = probe(python, root)
    if not p["loads"]:
        return False, f"the library does not load: {p['error']}", p
    if gpu and not p["cuda_kernels"]:
        return False, "the library has no CUDA kernels", p
    return True, f"{lib.name} is newer than every source", p


def build(mode: str, gpu_info: dict, out: Path, python: str) -> dict:
    res = {"status": "skipped", "seconds": 0.0, "ninja": shutil.which("ninja") is not None,
           "arch": arch_list(gpu_info["capability"]) if gpu_info["capability"] else None}
    if mode == "never":
        res["message"] = "--build never"
        return res
    if mode == "auto":
        fresh, why, found = build_is_fresh(gpu_info["gpu"] is not None, python)
        if fresh:
            res.update(status="up to date", message=why, **found)
            return res
        log(f"building: {why}")
    t0 = time.time()
    env = build_env(gpu_info["capability"], os.cpu_count() or 1)
    with open(out / "build.log", "w") as f:
        r = subprocess.run([python, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env, stdout=f,
                           stderr=subprocess.STDOUT)
    res["seconds"] = round(time.time() - t0, 1)
    text = (out / "build.log").read_text(errors="replace")
    spills = [line for line in text.splitlines() if "bytes spill" in line]
    res["spill_lines"] = sum(1 for line in spills if not line.strip().startswith("0 bytes spill stores, 0 bytes"))
    res["ptxas_lines"] = len([line for line in text.splitlines() if "ptxas info" in line])
    if r.returncode != 0:
        res.update(status="failed", message="\n".join(text.splitlines()[-15:]))
        return res
    res.update(status="built", message="build.log", **probe(python))
    return res


# ----------------------------------------------------------------------------- machine
def machine(commit: str) -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    driver = "unknown"
    if gpu and shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        driver = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "unknown"
    if not commit:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True) \
            if shutil.which("git") else None
        commit = r.stdout.strip() if r is not None and r.returncode == 0 else "unknown (no .git; pass COMMIT=)"
    return {"gpu": gpu, "capability": list(torch.cuda.get_device_capability(0)) if gpu else None,
            "driver": driver, "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "cores": os.cpu_count(), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ----------------------------------------------------------------------------- tests
def parse_test_log(path: Path) -> dict:
    """Counts from a gpu_check_pytest log: outcome per test (a failed teardown turns a pass into an error),
    the failures with their last line, and the collected tests that never reported."""
    collected, outcome, messages, stopped = [], {}, {}, None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec["event"] == "collected":
                collected = rec["ids"]
            elif rec["event"] == "stopped":
                stopped = rec["reason"]
            elif rec["event"] == "result":
                prev = outcome.get(rec["id"])
                if prev in ("failed", "error") and rec["outcome"] not in ("failed", "error"):
                    continue
                outcome[rec["id"]] = rec["outcome"]
                if rec["message"]:
                    messages[rec["id"]] = rec["message"]
    counts = {k: sum(1 for v in outcome.values() if v == k) for k in ("passed", "failed", "error", "skipped")}
    not_run = [t for t in collected if t not in outcome]
    failures = [{"id": t, "message": messages.get(t, "")} for t, v in outcome.items() if v in ("failed", "error")]
    return {"collected": len(collected), **counts, "not_run": len(not_run), "not_run_ids": not_run[:20],
            "failures": failures, "stopped": stopped}


def run_tests(part: str, deadline: float, out: Path, python: str) -> dict:
    if importlib.util.find_spec("pytest") is None:
        return {"status": "pytest missing", "message": "pytest is not installed for this Python: no test ran"}
    jsonl = out / f"tests-{part}.jsonl"
    jsonl.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    cmd = [python, "-m", "pytest", "-q", "-rfE", "-p", "gpu_check_pytest", "-p", "no:cacheprovider",
           "--gpu-check-part", part, "--gpu-check-deadline", str(deadline), "--gpu-check-log", str(jsonl),
           str(ROOT / "tests")]
    t0 = time.time()
    status = "ran"
    with open(out / f"tests-{part}.log", "w") as f:
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                               timeout=max(5.0, deadline - time.time()) + GRACE_S)
            if r.returncode not in (0, 1, 2, 5):
                status = f"crashed (pytest exit {r.returncode})"
        except subprocess.TimeoutExpired:
            status = f"killed (a test outran the deadline by {GRACE_S:.0f} s)"
    res = {"status": status, "seconds": round(time.time() - t0, 1), **parse_test_log(jsonl),
           "log": f"tests-{part}.log"}
    if res["stopped"] and status == "ran":
        res["status"] = "stopped at the deadline"
    return res


# ----------------------------------------------------------------------------- benchmarks
def run_bench(deadline: float, out: Path, python: str) -> dict:
    path = out / "bench.json"
    path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    cmd = [python, str(HERE / "gpu_check_bench.py"), "--deadline", str(deadline), "--json", str(path)]
    t0 = time.time()
    status = "ran"
    with open(out / "bench.log", "w") as f:
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                               timeout=max(5.0, deadline - time.time()) + GRACE_S)
            if r.returncode != 0:
                status = f"crashed (exit {r.returncode}, see bench.log)"
        except subprocess.TimeoutExpired:
            status = f"killed (outran the deadline by {GRACE_S:.0f} s)"
    res = json.loads(path.read_text()) if path.exists() else {}
    res.update(status=status, seconds=round(time.time() - t0, 1), log="bench.log")
    return res


# ----------------------------------------------------------------------------- summary
def _fmt_ms(t: dict | None, name: str) -> str:
    if not t or t.get("times_ms", {}).get(name) is None:
        return "-"
    mark = " (!)" if name in t.get("untrusted", []) else ""
    return f"{t['times_ms'][name]:.3f} ±{100 * t['spread'].get(name, 0):.0f}%{mark}"


def compiled(row: dict) -> str:
    """fused vs torch.compile from the run that interleaved those two sides, when there was one."""
    return f"{row['compiled_vs_fused']:.2f}x" if row.get("compiled_vs_fused") else ""


def summary_markdown(res: dict) -> str:
    m = res.get("machine", {})
    lines = ["# make gpu-check", ""]
    gpu = m.get("gpu")
    cap = "sm_" + "".join(str(v) for v in m["capability"]) if m.get("capability") else "-"
    lines.append(f"GPU: {gpu or 'none'} ({cap}), driver {m.get('driver', '?')}; torch {m.get('torch')} (CUDA "
                 f"{m.get('cuda')}); Python {m.get('python')}; {m.get('cores')} cores; commit {m.get('commit')}; "
                 f"{m.get('date')}; {res.get('seconds', 0):.0f} s of a {res.get('budget_s', 0):.0f} s budget.")
    lines.append("")
    if not gpu:
        lines += [f"**{NO_GPU}.**", ""]
    b = res.get("build", {})
    lines += ["## Build", ""]
    kern = {True: "yes", False: "no"}.get(b.get("cuda_kernels"), "?")
    lines.append(f"{b.get('status', '?')} ({b.get('seconds', 0):.0f} s; arch {b.get('arch') or '-'}; ninja: "
                 f"{'yes' if b.get('ninja') else 'no (serial build)'}; CUDA kernels: {kern}"
                 + (f"; ptxas: {b['ptxas_lines']} kernels, {b['spill_lines']} with spills" if b.get("ptxas_lines")
                    else "") + f"): {b.get('message', '')}")
    lines.append("")
    tests = res.get("tests", {})
    if tests:
        lines += ["## Tests", "", "| part | status | passed | failed | errors | skipped | not run | seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for part, t in tests.items():
            lines.append(f"| {part} | {t.get('status')} | {t.get('passed', 0)} | {t.get('failed', 0)} | "
                         f"{t.get('error', 0)} | {t.get('skipped', 0)} | {t.get('not_run', 0)} | "
                         f"{t.get('seconds', 0):.0f} |")
        for part, t in tests.items():
            for f in t.get("failures", []):
                lines.append(f"- FAILED ({part}) `{f['id']}`: {f['message']}")
        lines.append("")
    bench = res.get("bench")
    if bench:
        lines += bench_markdown(bench)
    if res.get("not_run"):
        lines += ["## Did not run", ""] + [f"- {item}" for item in res["not_run"]] + [""]
    return "\n".join(lines)


def bench_markdown(bench: dict) -> list:
    lines = ["## Benchmarks", "", f"{bench.get('status', '?')} ({bench.get('seconds', 0):.0f} s).", ""]
    rows = bench.get("lgm", [])
    if rows:
        lines += [f"### L-GM loss, forward+backward, N = {bench.get('n', 256)} (ms: median ± spread of the timed "
                  "calls, CUDA events; "
                  "MiB: max_memory_allocated growth)", "",
                  "| K | D | dtype | path | fused | plain eager | torch.compile | vs eager | vs compile | "
                  "fused MiB | eager MiB | compiled MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            t, mem = r["times_ms"], r.get("peak_mib", {})
            vs = lambda o, t=t: f"{t[o] / t['fused']:.2f}x" if t.get(o) and t.get("fused") else "-"  # noqa: E731
            mib = lambda o, mem=mem: f"{mem[o]:.1f}" if mem.get(o) is not None else "-"  # noqa: E731
            lines.append(f"| {r['k']} | {r['d']} | {r['dtype']} | {r['path']} | {_fmt_ms(r, 'fused')} | "
                         f"{_fmt_ms(r, 'plain_gemm')} | {_fmt_ms(r, 'compiled_gemm')} | {vs('plain_gemm')} | "
                         f"{compiled(r) or vs('compiled_gemm')} | {mib('fused')} | {mib('plain_gemm')} | "
                         f"{mib('compiled_gemm')} |")
        lines.append("")
    tc = bench.get("tensor_cores", [])
    if tc:
        lines += ["### The fused loss with float32 GEMMs (default) and with the tensor-core GEMMs (csrc/gemm.h)", "",
                  "| K | D | dtype | float32 GEMMs ms | tensor cores ms | tensor cores / float32 |",
                  "|---|---|---|---|---|---|"]
        for r in tc:
            lines.append(f"| {r['k']} | {r['d']} | {r['dtype']} | {_fmt_ms(r, 'float32_gemms')} | "
                         f"{_fmt_ms(r, 'tensor_cores')} | "
                         f"{r['times_ms']['tensor_cores'] / r['times_ms']['float32_gemms']:.2f} |")
        lines.append("")
    if bench.get("pgd_markdown"):
        lines += ["### PGD step", "", bench["pgd_markdown"], ""]
    for case in bench.get("kernels", []):
        lines += [f"### Kernels of one forward+backward, {case['case']} (torch.profiler, mean of {case['steps']} "
                  "steps) beside their floors (benchmarks/cuda_floors.py)", "",
                  "| kernels | measured µs | floor µs | measured / floor |", "|---|---|---|---|"]
        for r in case["rows"]:
            floor = ("-" if r.get("floor_us") is None
                     else f"{r['floor_us']:.1f}" + (f" ({r['bound']})" if r["bound"] else ""))
            ratio = f"{r['measured_us'] / r['floor_us']:.1f}x" if r.get("floor_us") else "-"
            lines.append(f"| {r['name']} | {r['measured_us']:.1f} | {floor} | {ratio} |")
        if case.get("unmatched"):
            lines.append(f"\n(other kernels, in 'other': {', '.join(case['unmatched'][:8])})")
        lines.append("")
    for e in bench.get("errors", []):
        lines.append(f"- ERROR {e}")
    if bench.get("errors"):
        lines.append("")
    return lines


def write_outputs(res: dict, out: Path) -> tuple:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "summary.md").write_text(summary_markdown(res) + "\n")
    return out / "summary.md", out / "results.json"


# ----------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "build" / "gpu-check"))
    p.add_argument("--seconds", type=float, default=450.0, help="the whole check's time budget")
    p.add_argument("--build", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--commit", default=os.environ.get("COMMIT", ""))
    a = p.parse_args(argv)
    t0 = time.time()
    end = t0 + a.seconds - RESERVE_S
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    res = {"schema": 1, "budget_s": a.seconds, "machine": machine(a.commit), "tests": {}, "not_run": []}
    info = {"gpu": res["machine"]["gpu"], "capability": res["machine"]["capability"]}
    log(f"GPU: {info['gpu'] or 'none'}; torch {res['machine']['torch']}; {os.cpu_count()} cores; "
        f"budget {a.seconds:.0f} s")

    def save():
        res["seconds"] = round(time.time() - t0, 1)
        write_outputs(res, out)

    res["build"] = build(a.build, info, out, python)
    log(f"build: {res['build']['status']} ({res['build'].get('message', '')[:200]})")
    failed = res["build"]["status"] == "failed"
    if not info["gpu"]:
        log(NO_GPU)
        res["not_run"].append("CUDA tests and GPU benchmarks: no GPU")
    elif failed:
        res["not_run"].append("everything after the build: it failed (build.log)")
    else:
        steps = (("cuda tests", 0.45), ("benchmarks", 0.6), ("rest of the suite", 1.0))
        for name, share in steps:
            left = end - time.time()
            if left < 15:
                res["not_run"].append(f"{name}: the time budget was spent")
                continue
            deadline = time.time() + share * left
            log(f"{name}: until {time.strftime('%H:%M:%S', time.localtime(deadline))}")
            if name == "benchmarks":
                res["bench"] = run_bench(deadline, out, python)
                failed |= bool(res["bench"].get("errors")) or not res["bench"]["status"].startswith("ran")
                res["not_run"] += [f"benchmark {s}" for s in res["bench"].get("skipped", [])]
            else:
                part = "cuda" if name == "cuda tests" else "rest"
                t = res["tests"][part] = run_tests(part, deadline, out, python)
                failed |= (bool(t.get("failed") or t.get("error"))
                           or t["status"] not in ("ran", "stopped at the deadline"))
                if t.get("not_run"):
                    first = ", ".join(t["not_run_ids"][:3])
                    res["not_run"].append(f"{t['not_run']} of the {part} tests (the first: {first})")
                if t["status"] == "pytest missing":
                    res["not_run"].append(f"the {part} tests: pytest is not installed")
            save()
    res["exit_code"] = 1 if failed else 0
    save()
    print(summary_markdown(res))
    log(f"summary: {out / 'summary.md'}; raw results: {out / 'results.json'}; {time.time() - t0:.0f} s")
    return res["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
