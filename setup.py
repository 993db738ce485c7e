"""Build hooks (everything else is in pyproject.toml).

- cffi compiles the native kernels (``cffi_modules``).
- build_py first generates the gRPC stubs from proto/ into the client
  package (``embtier.v1``); .proto files are the only source, the stubs are
  never edited or committed.
"""

import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"
STUB_PACKAGE = ROOT / "clients" / "embtier" / "v1"


def generate_stubs() -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "embtier" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as out:
        rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                          f"--grpc_python_out={out}", *protos])
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {protos}")
        for generated in (Path(out) / "embtier" / "v1").iterdir():
            shutil.copyfile(generated, STUB_PACKAGE / generated.name)


class BuildPyWithStubs(build_py):
    def run(self):
        generate_stubs()
        super().run()


setup(cffi_modules=["native/build_ffi.py:ffibuilder"], cmdclass={"build_py": BuildPyWithStubs})
