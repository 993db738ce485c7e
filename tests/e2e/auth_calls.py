"""One call of every method of the EmbeddingStore service, for the role tests (test_auth.py), made
in the test's process or, as another uid, in a child process:

    python -m tests.e2e.auth_calls TARGET UID GID GROUPS TENANT

The child imports what it needs as root, then takes the uid, gid and supplementary groups (GROUPS:
comma-separated, "" for none) and only then connects, so the daemon's SO_PEERCRED sees the new
uid.  It calls every method through the side socket's credential, as tenant TENANT ("" for none),
and prints {method: [status code name, details]} as JSON.

Every request is one the daemon accepts or refuses for its content (NOT_FOUND and the like) once the
role allows it: a PERMISSION_DENIED answer can only come from the role check.
"""

from __future__ import annotations

import json
import os
import sys

import grpc
import numpy as np
from embtier.v1 import embtier_pb2 as pb
from embtier.v1 import embtier_pb2_grpc as pb_grpc
from embtier.wire import TENANT_METADATA_KEY

from tests.support import credentialed_channel

TABLE = "t"  # the table the test made (4 x 4 float32)
MISSING = "no-such-table"


def requests(tag: str) -> dict[str, object]:
    """A request for each method; tag makes the table a caller creates its own."""
    ids = np.array([0, 1], "<i8").tobytes()
    return {
        "ListTables": pb.ListTablesRequest(),
        "DescribeTable": pb.DescribeTableRequest(name=TABLE),
        "Lookup": pb.LookupRequest(table=TABLE, ids=ids),
        "LookupPooled": pb.LookupPooledRequest(features=[pb.FeatureBags(
            table=TABLE, ids=ids, lengths=np.array([2], "<i4").tobytes())]),
        "GetTiers": pb.GetTiersRequest(),
        "GetHeat": pb.GetHeatRequest(table=TABLE),
        "GetPolicy": pb.GetPolicyRequest(table=TABLE),
        "ListCheckpoints": pb.ListCheckpointsRequest(),
        "ExportMapping": pb.ExportMappingRequest(table=MISSING),
        "WriteRows": pb.WriteRowsRequest(table=TABLE, ids=ids, values=np.zeros((2, 4), "<f4").tobytes()),
        "CreateTable": pb.CreateTableRequest(name=f"made-by-{tag}", num_rows=4, dim=4),
        "DropTable": pb.DropTableRequest(name=MISSING),
        "SetPolicy": pb.SetPolicyRequest(table=MISSING, policy="lru"),
        "Checkpoint": pb.CheckpointRequest(),
        "RestoreCheckpoint": pb.RestoreCheckpointRequest(id=10**9),
        "RecordTrace": pb.RecordTraceRequest(table=MISSING, max_ids=1),
    }


def call_each(channel: grpc.Channel, tag: str, tenant: str = "") -> dict[str, tuple[str, str]]:
    """Every method called once on channel: method -> (status code name, details)."""
    stub = pb_grpc.EmbeddingStoreStub(channel)
    metadata = ((TENANT_METADATA_KEY, tenant),) if tenant else ()
    out = {}
    for method, request in requests(tag).items():
        try:
            getattr(stub, method)(request, timeout=30, metadata=metadata)
            out[method] = ("OK", "")
        except grpc.RpcError as e:
            out[method] = (e.code().name, e.details() or "")
    return out


def main(argv: list[str]) -> int:
    target, uid, gid, groups, tenant = argv
    os.setgroups([int(g) for g in groups.split(",") if g])
    os.setgid(int(gid))
    os.setuid(int(uid))
    with credentialed_channel(target) as channel:
        print(json.dumps(call_each(channel, f"uid{uid}", tenant)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
