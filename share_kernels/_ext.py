"""Loader of the compiled extension (``csrc/``), called by the ops on their first use.

In order: the ahead-of-time build ``share_kernels._C`` (``pip install --no-build-isolation``);
else a just-in-time build of the same sources with ``torch.utils.cpp_extension.load`` (ninja)
into a cache directory, reused by later processes; else nothing, with one warning, and the ops
run their PyTorch reference. Importing this module does nothing: no build, no GPU query.
"""
from __future__ import annotations

import glob
import importlib
import logging
import os
import re
import subprocess
import sys
import warnings

import torch

_log = logging.getLogger(__name__)

#: How the extension was obtained: "aot", "jit" or "missing"; None until :func:`load` runs.
state: str | None = None


def sources_dir() -> str | None:
    """csrc/ shipped inside the package (wheels), else the checkout's csrc/ (editable installs)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(candidate, "ops.cpp")):
            return candidate
    return None


def cache_dir() -> str:
    """``$SHARE_KERNELS_CACHE`` or ``~/.cache/share_kernels``, one subdirectory per torch build."""
    base = os.environ.get("SHARE_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "share_kernels"
    )
    cuda = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    tag = f"torch{torch.__version__}-{cuda}-py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(base, re.sub(r"[^A-Za-z0-9_.-]", "_", tag))


def _build_cuda() -> bool:
    """A CUDA build of torch and a toolkit of the same major version (setup.py's rule)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    try:
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return False
    found = re.search(r"release (\d+)\.", out)
    return found is not None and found.group(1) == torch.version.cuda.split(".")[0]


def _jit_build(src: str) -> None:
    from torch.utils.cpp_extension import load as cpp_load

    sources = sorted(glob.glob(os.path.join(src, "*.cpp")))
    if _build_cuda():
        sources += sorted(glob.glob(os.path.join(src, "cuda", "*.cu")))
    build = cache_dir()
    os.makedirs(build, exist_ok=True)
    if not glob.glob(os.path.join(build, "share_kernels_C*.so")):
        _log.warning("share_kernels: compiling the C++ extension into %s (once per torch build)", build)
    cpp_load(
        name="share_kernels_C",
        sources=sources,
        extra_include_paths=[src],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3"],
        build_directory=build,
        is_python_module=False,  # loads the library with torch.ops.load_library
    )


def _load() -> str:
    try:
        importlib.import_module("share_kernels._C")
        return "aot"
    except ImportError as e:
        aot_error = e
    src = sources_dir()
    if src is None:
        reason = f"no prebuilt share_kernels._C ({aot_error}) and no csrc/ sources to build it from"
    else:
        try:
            _jit_build(src)
            return "jit"
        except Exception as e:  # no compiler, no ninja, a failing build: all end in the reference
            first_line = (str(e).strip().splitlines() or [""])[0]
            reason = f"no prebuilt share_kernels._C, and building it failed: {type(e).__name__}: {first_line}"
    warnings.warn(
        f"share_kernels: the compiled extension is unavailable ({reason}); "
        "project_complement and stability_loss (on CPU) run their pure-PyTorch references",
        RuntimeWarning,
        stacklevel=3,
    )
    return "missing"


def load() -> bool:
    """Load the extension once per process; True if its ops are registered with the dispatcher."""
    global state
    if state is None:
        state = _load()
    return state != "missing"
