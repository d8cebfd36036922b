"""Build of weightsync and its engine library (weightsync/_C.so).

- The CPU part is always built.
- The CUDA part (csrc/cuda/) is built whenever torch is a CUDA build and nvcc is found,
  whether or not a GPU is visible. Architectures come from TORCH_CUDA_ARCH_LIST; without it
  (or with "native"), the visible GPUs' archs, or DEFAULT_CUDA_ARCHS when none is visible.
  The list is settled here and handed to torch's builder, so the recorded one is the one
  compiled.
- WEIGHTSYNC_BUILD_EXT=0 gives a pure-Python install (the torch backend does everything).
- WEIGHTSYNC_BUILD_CUDA=0 skips the CUDA part even where it could be built.

The library holds no Python bindings: weightsync/_extension.py loads it with
torch.ops.load_library, which runs its operator registrations. Build metadata (torch, CUDA,
archs, Python) is written next to it in weightsync/_build_info.json so the loader can explain
a mismatch.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.lower() not in {"0", "false", "no", "off"}


def _pip_cuda_include_dirs() -> list[str]:
    """Headers shipped by the pip CUDA wheels (cusparse.h and friends live only there)."""
    dirs: list[str] = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            candidate = Path(entry) / sub
            if candidate.is_dir():
                dirs.append(str(candidate))
    return dirs


def _is_cuda_toolkit(root: Path) -> bool:
    return (root / "include" / "crt" / "host_config.h").exists() and any(
        (root / lib / "libcudart.so").exists() for lib in ("lib64", "lib"))


def _guess_cuda_home() -> None:
    """Point CUDA_HOME at a real toolkit before torch guesses.

    torch derives CUDA_HOME from the nvcc on PATH; when that is a wrapper script (as in
    /usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc) it picks /usr/local, which has
    neither the CUDA headers nor libcudart, and the link fails.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1])
        if Path(nvcc).stat().st_size < 4096:  # a wrapper script, not the compiler itself
            wrapped = Path(nvcc).read_text(errors="ignore").split()
            candidates += [Path(w).parents[1] for w in wrapped if w.endswith("/nvcc")]
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if _is_cuda_toolkit(root):
            os.environ["CUDA_HOME"] = str(root)
            return


def _visible_gpu_archs(torch) -> str | None:
    """The archs of the visible GPUs as TORCH_CUDA_ARCH_LIST spells them ("8.0;9.0+PTX"), or
    None when no GPU is visible.

    What torch's extension builder picks when the variable is unset: each GPU's compute
    capability, capped at the newest arch this torch was built for (nvcc is expected to
    match it), once each, PTX for the newest. Sorted by number, where torch sorts the strings
    ("10.0" before "9.0"), so the PTX goes to the newest arch on mixed machines too. Asking
    initialises CUDA in this build process only; importing weightsync never does.
    """
    if not torch.cuda.is_available():
        return None
    built = [int("".join(re.findall(r"\d+", arch.split("_", 1)[1])))
             for arch in torch.cuda.get_arch_list() if arch.startswith("sm_")]
    newest = max((sm // 10, sm % 10) for sm in built) if built else None
    capabilities = set()
    for index in range(torch.cuda.device_count()):
        capability = tuple(torch.cuda.get_device_capability(index))
        capabilities.add(min(capability, newest) if newest else capability)
    if not capabilities:
        return None
    archs = [f"{major}.{minor}" for major, minor in sorted(capabilities)]
    archs[-1] += "+PTX"
    return ";".join(archs)


def _cuda_archs(torch) -> str:
    """The CUDA archs to compile for: TORCH_CUDA_ARCH_LIST, else the visible GPUs', else
    DEFAULT_CUDA_ARCHS."""
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if requested and requested != "native":
        return requested
    return _visible_gpu_archs(torch) or DEFAULT_CUDA_ARCHS


def _extensions() -> tuple[list, dict, dict]:
    if not _flag("WEIGHTSYNC_BUILD_EXT", True):
        return [], {}, {"extension": False, "reason": "WEIGHTSYNC_BUILD_EXT=0"}

    _guess_cuda_home()
    import torch
    from torch.utils import cpp_extension

    sources = sorted(
        glob.glob(str(ROOT / "csrc" / "*.cpp"))
        + glob.glob(str(ROOT / "csrc" / "core" / "*.cpp"))
        + glob.glob(str(ROOT / "csrc" / "cpu" / "*.cpp"))
    )
    sources = [os.path.relpath(s, ROOT) for s in sources]
    include_dirs = [str(ROOT / "csrc" / "include"), str(ROOT / "csrc")]
    # The sources are C++20. torch's builder adds -std=c++17 unless a -std flag is given, up
    # to torch 2.13 (2.14 adds c++20 itself): without this, a torch 2.11 build fails.
    cxx_flags = ["-O3", "-std=c++20"]
    link_flags: list[str] = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is inline: it runs on torch's OpenMP threads only when compiled with
        # OpenMP (the host copier uses it, see core::Helpers). libgomp.so.1 then resolves to the
        # one torch already loaded.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-std=c++20"]
    define_macros: list[tuple[str, str | None]] = []

    nvcc = shutil.which("nvcc") or (
        str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc") if cpp_extension.CUDA_HOME else None
    )
    cuda_wanted = _flag("WEIGHTSYNC_BUILD_CUDA", True)
    with_cuda = bool(cuda_wanted and torch.version.cuda and nvcc and Path(nvcc).exists())
    why_not_cuda = None
    if not with_cuda:
        if not cuda_wanted:
            why_not_cuda = "WEIGHTSYNC_BUILD_CUDA=0"
        elif not torch.version.cuda:
            why_not_cuda = f"torch {torch.__version__} is a CPU-only build"
        else:
            why_not_cuda = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"

    archs = None
    if with_cuda:
        # torch's builder reads the variable; setting it makes the recorded list the built one.
        archs = os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_archs(torch)
        sources += [
            os.path.relpath(s, ROOT)
            for s in sorted(
                glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu"))
                + glob.glob(str(ROOT / "csrc" / "cuda" / "*.cpp"))
            )
        ]
        include_dirs += _pip_cuda_include_dirs()
        define_macros.append(("WEIGHTSYNC_WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}

    # The tree-identity walk (weightsync/tree_identity.py): a plain CPython extension, no torch.
    entries = Extension(
        name="weightsync._entries",
        sources=[os.path.join("csrc", "python", "entries.cpp")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"]},
    )
    ext = ext_cls(
        name="weightsync._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link_flags,
    )
    info = {
        "extension": True,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_skipped_because": why_not_cuda,
        "cuda_archs": archs,
        "python": platform.python_version(),
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext, entries], {"build_ext": build_ext}, info


def _write_build_info(info: dict) -> None:
    (ROOT / "weightsync" / "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")


def main() -> None:
    ext_modules, cmdclass, build_info = _extensions()
    _write_build_info(build_info)
    setup(
        name="weightsync",
        version="0.1.0",
        description="Fast, consistent weight synchronisation between a trainer and its workers.",
        packages=find_packages(include=["weightsync", "weightsync.*"]),
        package_data={"weightsync": ["_build_info.json", "py.typed"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        python_requires=">=3.10",
        install_requires=["torch>=2.5", "tensordict>=0.9"],
        extras_require={
            "test": ["pytest", "pytest-benchmark"],
            "torchrl": ["torchrl"],
            "cupy": ["cupy-cuda13x"],
        },
        entry_points={"console_scripts": []},
        zip_safe=False,
    )


# `python setup.py ...` and pip's build backend (setuptools.build_meta) both run this file as
# __main__; tests import it for its helpers without building or writing anything.
if __name__ == "__main__":
    main()
