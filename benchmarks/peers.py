"""Peer servers for benchmarks, built from source on this machine and cached (nothing of them is committed).

    python benchmarks/peers.py           # build (once) and print the path of llama.cpp's C++ llama-server

`llama_server()` returns llama.cpp's own `llama-server` built from the llama.cpp that the llama-cpp-python
sdist vendors (LLAMA_CPP_PYTHON_VERSION, the one qwenkit's engine links), so both sides run the same kernels.
It downloads the sdist with pip into the cache, extracts vendor/llama.cpp, builds only the llama-server
target with cmake (Release, GGML_NATIVE=ON like the wheel, static, no tests/examples/UI/OpenSSL: offline) and
keeps the binary under `cache_root()/bench/`; later calls return it without building (~7 min on 2 cores).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from qwenkit.paths import cache_root

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    # Offline build: no HTTPS model download, no web UI fetched from the hub or built with npm.
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
)


def _sdist(root: Path, version: str) -> Path:
    """The llama-cpp-python sdist tarball, downloaded once with pip (its HTTP cache usually has it)."""
    dest = root / "sdist"
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(dest)]
    subprocess.run([*pip, f"llama-cpp-python=={version}"], check=True)
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download left no llama_cpp_python-{version}.tar.gz in {dest}")
    return found[0]


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """vendor/llama.cpp of the sdist, extracted once into dest."""
    if (dest / "CMakeLists.txt").is_file():
        return dest
    prefix = sdist.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise RuntimeError(f"{sdist} holds no {prefix}")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
        tar.extractall(tmp, members=members, **safe)
        shutil.move(Path(tmp) / prefix, dest)  # whole tree at once: a half extraction never looks done
    return dest


def llama_server(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2) -> Path:
    """Path to a `llama-server` binary built from this llama-cpp-python version's vendored llama.cpp."""
    root = cache_root() / "bench" / f"llama.cpp-{version}"
    binary = root / "bin" / "llama-server"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    src = _extract_llama_cpp(_sdist(root, version), root / "src")
    build = root / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *generator, *CMAKE_OPTIONS], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], check=True)
    built = build / "bin" / "llama-server"
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, binary.with_suffix(".tmp"))
    binary.with_suffix(".tmp").rename(binary)  # appears only once complete
    return binary


if __name__ == "__main__":
    print(llama_server())
