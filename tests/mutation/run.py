"""Mutation check of the kernel tests: apply each mutant of ``mutants.py`` alone and assert the suite kills it.

Usage (from the repository root, the C++ extension built in place)::

    python tests/mutation/run.py                 # every mutant (``make mutants``)
    python tests/mutation/run.py --only cpu-     # mutants whose name starts with a prefix
    python tests/mutation/run.py --list

The working tree (tracked and untracked files, not ``.venv``/``build``) is copied to a scratch directory, with
the built extension; the unmutated copy must pass the kill tests first (else every mutant would look killed).
A Triton/Python or CUDA-emulation mutant runs the tests directly (its own, where ``Mutant.tests`` names them); a
C++ mutant recompiles ``csrc/monarch_cpu.cpp`` of the copy
(setup.py's flags at ``-O1``) and relinks the extension, which is restored afterwards. A mutant is *killed* when pytest
reports a failure or the test process crashes, *survives* when the tests pass, and is an *error* when the
snippet does not match exactly once, the mutated extension does not build, or pytest cannot collect. Exit
status 0 only when every mutant is killed.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from mutants import MUTANTS, Mutant  # noqa: E402

#: the kernel tests every mutant runs against, the most discriminating first (the first failure stops the run);
#: the other files of tests/monarch_kernels follow
FIRST = ["test_properties.py", "test_reliability.py", "test_cpu_ext.py", "test_triton.py", "test_fused_backward.py"]


def kill_tests(tree: str) -> list[str]:
    rest = sorted(os.path.basename(p) for p in glob.glob(os.path.join(tree, "tests", "monarch_kernels", "test_*.py")))
    return [os.path.join("tests", "monarch_kernels", f) for f in FIRST + [f for f in rest if f not in FIRST]]


def copy_tree(dst: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))
    for so in glob.glob(os.path.join(ROOT, "monarch_kernels", "_C*.so")):  # the built extension (git-ignored)
        shutil.copy2(so, os.path.join(dst, "monarch_kernels"))
    # the package maps monarch_kernels.layers to layers/ (setup.py package_dir); without this link the copy's tests
    # would import the editable install's layers/ (the real tree's), and a mutant there would go unseen
    os.symlink(os.path.join("..", "layers"), os.path.join(dst, "monarch_kernels", "layers"))


def build(tree: str, sources=("monarch_cpu.cpp", "ops.cpp")) -> str:
    """Rebuild the CPU extension of ``tree`` in place ("" on success, else the compiler's complaint).

    The same sources and ``-march=native`` as setup.py, at ``-O1`` (a few times faster to compile; the mutants
    change semantics, not speed); only the files in ``sources`` are recompiled."""
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    out = os.path.join(tree, "build", "mutants")
    os.makedirs(out, exist_ok=True)
    flags = ["-std=c++17", "-O1", "-march=native", "-fPIC", "-fopenmp", "-w", "-DTORCH_EXTENSION_NAME=_C",
             "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *(f"-I{p}" for p in cpp_extension.include_paths()), f"-I{sysconfig.get_paths()['include']}"]
    jobs = [subprocess.Popen(["c++", *flags, "-c", os.path.join(tree, "csrc", s), "-o", os.path.join(out, s + ".o")],
                             stderr=subprocess.PIPE, text=True) for s in sources]
    outputs = [job.communicate()[1] for job in jobs]
    errors = [err for job, err in zip(jobs, outputs) if job.returncode]
    if errors:
        return "\n".join(errors)[-3000:]
    libdirs = cpp_extension.library_paths()
    target = os.path.join(tree, "monarch_kernels", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    for old in glob.glob(os.path.join(tree, "monarch_kernels", "_C*.so")):
        os.remove(old)
    res = subprocess.run(["c++", "-shared", "-fopenmp", *glob.glob(os.path.join(out, "*.o")), "-o", target,
                          *(f"-L{d}" for d in libdirs), *(f"-Wl,-rpath,{d}" for d in libdirs),
                          "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"], capture_output=True, text=True)
    return res.stderr[-3000:] if res.returncode else ""


def tests_for(tree: str, mutants) -> list[str]:
    """The tests that must kill ``mutants``: their own where given, else the kernel tests (each once)."""
    tests = []
    for m in mutants:
        for t in (m.tests or kill_tests(tree)):
            if t not in tests:
                tests.append(t)
    return tests


def run_tests(tree: str, timeout: float, tests: list[str]) -> tuple[str, str]:
    """(``passed`` | ``killed`` | ``error``, detail) of ``tests`` in ``tree``."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    try:
        res = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error", f"timeout after {timeout:.0f} s"
    failed = [line for line in res.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if res.returncode == 0:
        return "passed", ""
    if res.returncode == 1 or res.returncode < 0:  # test failures, or the process crashed (signal)
        return "killed", failed[0] if failed else f"crashed (return code {res.returncode})"
    return "error", f"pytest exit {res.returncode}: {res.stdout[-500:]}{res.stderr[-500:]}"


def apply(tree: str, m: Mutant) -> str:
    path = os.path.join(tree, m.path)
    with open(path) as f:
        original = f.read()
    count = original.count(m.snippet)
    if count != 1:
        raise ValueError(f"{m.name}: the snippet occurs {count} times in {m.path}; re-target the mutant")
    with open(path, "w") as f:
        f.write(original.replace(m.snippet, m.replacement))
    return original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the mutants whose name starts with this prefix")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per test run")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the unmutated tests first")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if m.name.startswith(args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.path:40} {m.models}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="monarch-mutants-") as tree:
        copy_tree(tree)
        native = glob.glob(os.path.join(tree, "monarch_kernels", "_C*.so"))
        if any(m.compiled for m in chosen):
            err = build(tree)
            if err:
                print(err)
                return 2
            native = glob.glob(os.path.join(tree, "monarch_kernels", "_C*.so"))
            shutil.copy2(native[0], os.path.join(tree, "build", "mutants", "unmutated.so"))
        if not args.skip_baseline:
            t0 = time.time()
            status, detail = run_tests(tree, args.timeout, tests_for(tree, chosen))
            print(f"baseline (unmutated): {status} in {time.time() - t0:.0f} s {detail}", flush=True)
            if status != "passed":
                return 2
        for m in chosen:
            t0 = time.time()
            try:
                original = apply(tree, m)
            except ValueError as exc:
                results.append((m, "error", str(exc)))
                print(f"{m.name:34} error    {exc}", flush=True)
                continue
            try:
                err = build(tree, sources=(os.path.basename(m.path),)) if m.compiled else ""
                if err:
                    status, detail = "error", "the mutated extension does not build: " + err[-300:]
                else:
                    status, detail = run_tests(tree, args.timeout, tests_for(tree, [m]))
            finally:
                with open(os.path.join(tree, m.path), "w") as f:
                    f.write(original)
                if m.compiled:
                    shutil.copy2(os.path.join(tree, "build", "mutants", "unmutated.so"), native[0])
            status = "survived" if status == "passed" else status
            results.append((m, status, detail))
            print(f"{m.name:34} {status:8} {time.time() - t0:5.0f} s  {detail}", flush=True)
    killed = sum(s == "killed" for _, s, _ in results)
    print(f"\n{killed} of {len(results)} mutants killed")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
