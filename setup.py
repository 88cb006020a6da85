"""Builds stopkit's native modules with CMake (see CMakeLists.txt).

STOPKIT_CUDA=auto|0|1 selects the CUDA build (auto: when nvcc is found on PATH or in CUDA_HOME);
STOPKIT_DEBUG=1 makes the CUDA kernels trap on a bad index (the CPU kernels always check); MAX_JOBS caps parallel compiles.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def cuda_build() -> tuple[bool, str | None]:
    mode = os.environ.get("STOPKIT_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"STOPKIT_CUDA must be auto, 0 or 1, got {mode!r}")
    nvcc = find_nvcc()
    if mode == "1" and nvcc is None:
        raise SystemExit("STOPKIT_CUDA=1 but nvcc was not found (PATH, CUDA_HOME, /usr/local/cuda)")
    return (mode == "1" or (mode == "auto" and nvcc is not None)), nvcc


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        # Both modules come out of one CMake build; run it once, for _C.
        if ext.name != "stopkit._C":
            return
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        use_cuda, nvcc = cuda_build()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DSTOPKIT_CUDA={'ON' if use_cuda else 'OFF'}",
            f"-DSTOPKIT_DEBUG_CHECKS={'ON' if os.environ.get('STOPKIT_DEBUG') == '1' else 'OFF'}",
        ]
        if use_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        print(f"stopkit: building native modules (CUDA {'on' if use_cuda else 'off'})", flush=True)
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


ext_modules = [CMakeExtension("stopkit._C")]
if cuda_build()[0]:
    ext_modules.append(CMakeExtension("stopkit._C_cuda"))

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
