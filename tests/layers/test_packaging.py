"""The installed package: a wheel built from this tree installs ``monarch_kernels`` (with ``monarch_kernels.layers``)
and nothing else at top level, ships ``py.typed`` for both, and an install without the compiled extension says so
at build time and once at run time.

Builds a pure-Python wheel (``MONARCH_KERNELS_NO_EXT=1``) from a copy of the source tree, installs it into a fresh
virtual environment (``--without-pip``; torch and the other dependencies come from this environment's
site-packages through a ``.pth`` file, so nothing is downloaded) and imports it from a directory outside the tree.
"""
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__", "*.so", ".pytest_cache",
                              ".benchmarks", "runs", "out")


def _run(cmd, cwd, env=None, check=True):
    env = {k: v for k, v in (env or os.environ).items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "monarch-kernels"
    shutil.copytree(ROOT, src, ignore=SKIP)
    return src


def test_wheel_installs_only_the_namespaced_package(source_tree, tmp_path):
    env = {**os.environ, "MONARCH_KERNELS_NO_EXT": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(tmp_path / "dist"), str(source_tree)], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "dist").glob("monarch_kernels-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = str(venv / "bin" / "python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=tmp_path).stdout.strip()
    deps = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if os.path.isdir(p)]
    with open(os.path.join(purelib, "deps-from-test-env.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", str(wheel)],
         cwd=tmp_path)
    top_level = sorted(n for n in os.listdir(purelib) if not n.endswith((".pth", ".dist-info")) and n != "__pycache__")
    assert top_level == ["monarch_kernels"], top_level

    check = textwrap.dedent(f"""
        import importlib.util, os, sys, warnings
        assert not any(p and os.path.samefile(p, {str(source_tree)!r}) for p in sys.path if os.path.isdir(p))
        for name in ("layers", "methods", "bench"):
            assert importlib.util.find_spec(name) is None, name
        import torch
        import monarch_kernels, monarch_kernels.layers as L
        from monarch_kernels.layers import convert
        assert L.__file__.startswith({purelib!r}), L.__file__
        assert convert.MonarchLinear is L.MonarchLinear and sys.modules["monarch_kernels.layers"] is L
        for pkg in (monarch_kernels, L):
            assert os.path.isfile(os.path.join(os.path.dirname(pkg.__file__), "py.typed")), pkg
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = L.MonarchLinear(16, 16)(torch.randn(2, 16))
            L.MonarchLinear(16, 16)(torch.randn(2, 16))
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "pip install --no-build-isolation" in messages[0], messages
        assert y.shape == (2, 16)
        print("ok")
    """)
    out = _run([python, "-c", check], cwd=tmp_path)
    assert out.stdout.strip().endswith("ok")
    proc = _run([python, "-c", "import layers"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "No module named 'layers'" in proc.stderr


def test_build_says_loudly_when_the_extension_is_skipped(source_tree, tmp_path):
    shutil.copytree(source_tree, tmp_path / "tree", ignore=shutil.ignore_patterns("csrc"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONARCH_KERNELS_")}
    proc = _run([sys.executable, "setup.py", "--version"], cwd=tmp_path / "tree", env=env)
    assert "NOT building the C++/CUDA kernels: no csrc/*.cpp sources" in proc.stderr
    assert "pip install --no-build-isolation" in proc.stderr and proc.stdout.strip().endswith("0.1.0")
    proc = _run([sys.executable, "setup.py", "--version"], cwd=tmp_path / "tree",
                env={**env, "MONARCH_KERNELS_REQUIRE_EXT": "1"}, check=False)
    assert proc.returncode != 0 and "NOT building the C++/CUDA kernels" in proc.stderr
    proc = _run([sys.executable, "setup.py", "--version"], cwd=tmp_path / "tree",
                env={**env, "MONARCH_KERNELS_NO_EXT": "1"})
    assert "NOT building" not in proc.stderr
