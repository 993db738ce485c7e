"""The wire vocabulary (embtier.wire) is the one set of names: every enum of the contract is
covered by its mapping, the kernels number what they share in the same order, info types survive
the trip through their messages, and the packages import each other only as designed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from embtier import wire
from embtier.v1 import embtier_pb2 as pb
from embtierd import native

ROOT = Path(__file__).resolve().parents[2]

ENUMS = [(wire.DTYPES, pb.DType), (wire.ID_TYPES, pb.IdType), (wire.INITIALIZERS, pb.Initializer),
         (wire.POOL_MODES, pb.PoolingMode), (wire.WRITE_MODES, pb.WriteMode), (wire.OFFLOADS, pb.Offload),
         (wire.CHECKPOINT_KINDS, pb.CheckpointKind), (wire.QUANTIZERS, pb.Quantizer), (wire.KEY_SPACES, pb.KeySpace)]


@pytest.mark.parametrize("mapping, enum", ENUMS, ids=[e.DESCRIPTOR.name for _, e in ENUMS])
def test_every_enum_value_has_its_name(mapping, enum):
    assert sorted(mapping.values()) == sorted(enum.values())
    for name, code in mapping.items():
        assert name == enum.Name(code).lower().removeprefix("key_space_") and wire.name_of(mapping, code) == name


def test_the_wire_dtypes_are_the_storage_dtypes_that_travel():
    assert set(wire.WIRE_DTYPES) == set(wire.WIRE_ARRAYS) < set(wire.DTYPES)
    assert set(wire.ID_TYPES) == set(wire.ID_ARRAYS)


def test_the_kernels_number_tiers_dtypes_and_pooling_modes_as_the_wire_orders_them():
    assert [native.TIER_DRAM, native.TIER_CXL, native.TIER_SCM] == [wire.TIERS.index(t) for t in wire.TIERS]
    assert list(native.DTYPES) == list(wire.DTYPES) and list(native.POOL_MODES) == list(wire.POOL_MODES)
    assert set(native.QUANT_BITS) == set(wire.QUANT_BITS) - {0}


def test_info_types_survive_their_messages():
    port = wire.PortInfo("cxl0", -1, 1 << 20, 4096)
    tier = wire.TierInfo("cxl", 1 << 20, 4096, -1, True, "", (port,))
    table = wire.TableInfo("t", 10, 4, "float16", {"dram": 10}, {"dram": 80}, 3, 50, {"dram": False}, {"cxl0": 0},
                           "managed", 0, 0.5, 7, 2, 160, 3, 1)
    policy = wire.TablePolicy("t", "lfu", "", -1, 1 << 20, 5, 0, 1.0, 256 << 20, True)
    for info in (port, tier, table, policy):
        assert type(info).from_message(info.to_message()) == info


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level) of every import in a source file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module, id(node) in top))
    return found


def test_the_packages_import_each_other_only_through_the_wire_contract():
    # the daemon takes the generated stubs, the vocabulary, human sizes and the cluster's layout in etcd from
    # the client package, nothing else
    for path in (ROOT / "daemon" / "embtierd").rglob("*.py"):
        for module, _ in imports(path):
            if module.split(".")[0] in ("embtier", "embtier_tools"):
                assert module in ("embtier", "embtier.v1", "embtier.wire", "embtier.sizes", "embtier.cluster.coord"), \
                    (path, module)
    # the client library never imports the daemon, and the tools only where a tool command runs
    for path in (ROOT / "clients" / "embtier").rglob("*.py"):
        for module, top_level in imports(path):
            assert module.split(".")[0] != "embtierd", (path, module)
            assert not (module.startswith("embtier_tools") and top_level), (path, module)


def test_the_clients_row_stride_is_the_kernels():
    from embtier.sizes import row_stride
    from embtierd import native
    for dtype in ("float32", "float16", "int8"):
        for dim in (*range(1, 70), 127, 128, 129, 1000, 4096):
            assert row_stride(dim, dtype) == native.row_stride(dim, dtype), (dim, dtype)
    with pytest.raises(ValueError, match="dtype must be"):
        row_stride(8, "bfloat16")
