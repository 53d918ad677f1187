"""Build definition of sus_torch: the C++ op (torch.utils.cpp_extension) plus the Python package.

  pip install --no-build-isolation ./python           (into a venv made with --system-site-packages,
                                                      or with --target DIR; offline: no build deps fetched)
  python3 setup.py build_ext --inplace                (in python/: what scripts/test does)

Environment: SUS_TORCH_MARCH (default "native": the sus kernels' vector width comes from the
build's instruction set, as with CMake's sus::native; set it empty for a portable build).
"""
import os
import pathlib

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths

here = pathlib.Path(__file__).resolve().parent
include = here.parent / "include"  # the sus headers (header-only library)
if not (include / "sus" / "sus.hpp").exists():
    raise SystemExit(f"sus_torch: the sus headers are not at {include}; build from the sus repository")

march = os.environ.get("SUS_TORCH_MARCH", "native")
cxx_flags = ["-std=c++17", "-O3", "-g0", "-DNDEBUG", "-fopenmp", "-Wall", "-Wextra"]
# torch's headers as system headers: -Wall -Wextra then warn about this code only.
cxx_flags += [f"-isystem{path}" for path in include_paths() + ["/usr/include/eigen3"]]
if march:
    cxx_flags.append(f"-march={march}")

setup(
    ext_modules=[
        CppExtension(
            "sus_torch._C",
            ["sus_torch/csrc/attention.cpp"],
            include_dirs=[str(include)],
            depends=[str(p) for p in sorted(include.rglob("*.hpp"))],
            extra_compile_args=cxx_flags,
            extra_link_args=["-fopenmp"],  # libgomp: the OpenMP runtime Debian's torch uses too
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
)
