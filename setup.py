"""Build structlik. The CPU extension (csrc/*.cpp) is always built when torch's
C++ toolchain is there; the package still imports and runs on its reference
backend if it is not (STRUCTLIK_NO_EXTENSION=1 skips it on purpose)."""
import glob
import os

from setuptools import find_packages, setup


def extension_modules():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("STRUCTLIK_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug = os.environ.get("STRUCTLIK_DEBUG") == "1"
    # Portable by default: the baseline x86-64 instruction set, with each kernel's loops
    # compiled again for AVX2 and AVX-512 and chosen when the library loads (csrc/stencil.h,
    # STRUCTLIK_CLONES), so one wheel runs on any x86-64 CPU at its best speed.
    # STRUCTLIK_CPU_ARCH=native (or another -march value) builds for one CPU only, without clones.
    arch = os.environ.get("STRUCTLIK_CPU_ARCH", "")
    # -fopenmp-simd: the kernels' `#pragma omp simd` loops (reductions GCC may then reassociate);
    # threads come from torch::stable::parallel_for, torch's own pool, so no OpenMP runtime is linked.
    # -fno-math-errno: nothing reads errno, and with it gcc keeps libm calls (std::sqrt in
    # standard_normal.cpp) that stop loops from vectorising.
    flags = ["-O0", "-g", "-fopenmp-simd"] if debug else ["-O3", "-fopenmp-simd", "-fno-math-errno"] + (
        [f"-march={arch}", "-DSTRUCTLIK_NO_CLONES"] if arch else [])
    # The stable ABI (csrc/torch_api.h): only torch's C shim is imported, so the library
    # loads on every torch >= 2.10; with the limited Python API, on every CPython >= 3.9 (abi3).
    flags += ["-DTORCH_TARGET_VERSION=0x020a000000000000", "-DPy_LIMITED_API=0x03090000"]
    ext = CppExtension(
        "structlik._C",
        sources,
        # the headers: rebuilt when they change, and shipped in a source distribution
        depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),
        extra_compile_args={"cxx": flags},
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["structlik", "structlik.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
