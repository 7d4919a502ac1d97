"""Builds the native CPU kernels (model/cpu_kernels: matmuls, attention, the greedy choice) into
model/_cpu_kernels*.so; everything else is in pyproject.toml. The kernels include XLA's FFI headers, which
ship with jaxlib (`jax.ffi.include_dir()`). The build is optional: without a C++ compiler the package
installs and runs on XLA's matmuls alone (model/cpu_matmul.py says so when a model loads)."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildWithJaxHeaders(build_ext):
    def build_extensions(self):
        import jax.ffi

        for ext in self.extensions:
            ext.extra_compile_args += ["-isystem", jax.ffi.include_dir()]
        super().build_extensions()


setup(
    ext_modules=[Extension(
        "model._cpu_kernels",
        sources=["model/cpu_kernels/matmul.cc", "model/cpu_kernels/attention.cc", "model/cpu_kernels/greedy.cc",
                 "model/cpu_kernels/module.cc"],
        depends=["model/cpu_kernels/kernels.h", "model/cpu_kernels/parallel.h", "model/cpu_kernels/simd.inc"],
        language="c++",
        # No -march: matmul.cc compiles its SIMD kernels per instruction set and picks one at run time.
        extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=fast"],
        optional=True,
    )],
    cmdclass={"build_ext": BuildWithJaxHeaders},
)
