"""cffi out-of-line API-mode builder for the embtier kernels.

Compiles native/src/*.c into the extension module ``embtierd._native``.
The cdef is native/include/embtier.h itself, so the declarations have one
source.  Run by setuptools through ``cffi_modules`` in setup.py.
"""

from pathlib import Path

from cffi import FFI

NATIVE = Path(__file__).resolve().parent
HEADER = NATIVE / "include" / "embtier.h"
SOURCES = sorted(str(p.relative_to(NATIVE.parent)) for p in (NATIVE / "src").glob("*.c"))

ffibuilder = FFI()
ffibuilder.cdef(HEADER.read_text())
ffibuilder.set_source(
    "embtierd._native",
    '#include <stdint.h>\n#include "embtier.h"\n',
    sources=SOURCES,
    include_dirs=[str(NATIVE / "include"), str(NATIVE / "src")],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-strict-aliasing"],
    libraries=["pthread", "m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
