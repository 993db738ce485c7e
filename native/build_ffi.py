"""cffi out-of-line API-mode builder for the embtier kernels.

Compiles native/src/*.c into the extension module ``embtierd._native``.
The cdef is native/include/embtier.h itself, so the declarations have one
source.  Run by setuptools through ``cffi_modules`` in setup.py.

``builder()`` makes the same build under another module name, e.g. the
AddressSanitizer build that tests/unit/test_native_boundary.py compiles
into a temporary directory with ``FFI.compile(tmpdir=...)``.
"""

import os
from pathlib import Path

from cffi import FFI

NATIVE = Path(__file__).resolve().parent
HEADER = NATIVE / "include" / "embtier.h"
# -ffp-contract=off: no fused multiply-adds the source does not ask for, whatever CFLAGS add (a
# checkpoint's quantized bytes must not depend on the compiler's or the host's choices)
COMPILE_ARGS = ["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-strict-aliasing",
                "-ffp-contract=off"]


def builder(module: str, sanitize: str = "", absolute_paths: bool = False, optimize: str = "-O3") -> FFI:
    """An FFI that compiles the kernels into the extension module ``module``.

    sanitize: a -fsanitize= value ("address": load the module in a Python run with
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0).
    absolute_paths: name the sources by absolute path, as FFI.compile(tmpdir=...) needs (it compiles
    inside tmpdir); setuptools wants them relative to the repository, where it runs.
    optimize: the -O option (an instrumented -O0 build compiles several times faster).
    """
    sources = sorted(p if absolute_paths else p.relative_to(NATIVE.parent) for p in (NATIVE / "src").glob("*.c"))
    sanitizer = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"] if sanitize else []
    ffi = FFI()
    ffi.cdef(HEADER.read_text())
    ffi.set_source(
        module,
        '#include <stdint.h>\n#include "embtier.h"\n',
        sources=[str(p) for p in sources],
        include_dirs=[str(NATIVE / "include"), str(NATIVE / "src")],
        extra_compile_args=[optimize, *COMPILE_ARGS, *sanitizer],
        extra_link_args=sanitizer,
        libraries=["pthread", "m"],
    )
    return ffi


# EMBTIER_SANITIZE=address builds the installed kernels with AddressSanitizer.
ffibuilder = builder("embtierd._native", os.environ.get("EMBTIER_SANITIZE", ""))

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
