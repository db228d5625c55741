"""Build of the compiled part of share_kernels: the ``share_kernels._C`` extension from ``csrc/``.

Metadata lives in pyproject.toml; this file only adds the extension. It is built against the
torch that is already installed (``pip install --no-build-isolation``):

* always a CppExtension (CPU kernels, OpenMP, -O3);
* a CUDAExtension instead when torch is a CUDA build and a CUDA toolkit of the same major
  version is found. No GPU is queried: ``TORCH_CUDA_ARCH_LIST`` defaults to ``9.0``.

When torch cannot be imported at build time (pip's build isolation) the package installs as pure
Python and ``share_kernels._ext`` compiles the same sources on first use. Either way ``csrc/``
is shipped inside the package so that this just-in-time build finds its sources.
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package as share_kernels/csrc (for the just-in-time build)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads csrc/ from the checkout
        target = os.path.join(self.build_lib, "share_kernels", "csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(HERE, "csrc"), target)


def nvcc_major(cuda_home):
    try:
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


def extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("share_kernels: torch is not importable at build time; installing pure Python "
              "(the extension is built on first use)")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    kwargs = dict(include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    if torch.version.cuda is not None and CUDA_HOME is not None:
        found = nvcc_major(CUDA_HOME)
        if found == int(torch.version.cuda.split(".")[0]):
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
            ext = CUDAExtension(
                "share_kernels._C",
                sources + sorted(glob.glob("csrc/cuda/*.cu")),
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                **kwargs,
            )
            return [ext], {"build_ext": BuildExtension}
        print(f"share_kernels: CUDA toolkit {found} at {CUDA_HOME} does not match torch's CUDA "
              f"{torch.version.cuda}; building the CPU kernels only")
    ext = CppExtension("share_kernels._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
