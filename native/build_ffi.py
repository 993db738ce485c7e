"""cffi out-of-line API-mode builder for the embtier kernels.

Compiles native/src/*.c into the extension module ``embtierd._native``.
The cdef is native/include/embtier.h itself, so the declarations have one
source.  Run by setuptools through ``cffi_modules`` in setup.py.
"""

import os
from pathlib import Path

from cffi import FFI

NATIVE = Path(__file__).resolve().parent
HEADER = NATIVE / "include" / "embtier.h"
SOURCES = sorted(str(p.relative_to(NATIVE.parent)) for p in (NATIVE / "src").glob("*.c"))

# EMBTIER_SANITIZE=address builds the kernels with AddressSanitizer (run Python with
# LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0).
SANITIZE = [f"-fsanitize={os.environ['EMBTIER_SANITIZE']}", "-fno-omit-frame-pointer"] \
    if os.environ.get("EMBTIER_SANITIZE") else []

ffibuilder = FFI()
ffibuilder.cdef(HEADER.read_text())
ffibuilder.set_source(
    "embtierd._native",
    '#include <stdint.h>\n#include "embtier.h"\n',
    sources=SOURCES,
    include_dirs=[str(NATIVE / "include"), str(NATIVE / "src")],
    # -ffp-contract=off: no fused multiply-adds the source does not ask for, whatever CFLAGS add (a
    # checkpoint's quantized bytes must not depend on the compiler's or the host's choices)
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-strict-aliasing",
                        "-ffp-contract=off", *SANITIZE],
    extra_link_args=SANITIZE,
    libraries=["pthread", "m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
