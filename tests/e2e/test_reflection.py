"""Server reflection of a real daemon, as the clients of other languages ask
for it: grpc.reflection.v1 (grpcurl, Postman) spoken with the protocol's own
messages, and grpc.reflection.v1alpha through grpcio-reflection's client."""

from __future__ import annotations

import grpc
import pytest
from embtier.v1 import embtier_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICES = {"embtier.v1.EmbeddingStore", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"}
V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"

# The messages of grpc/reflection/v1/reflection.proto (grpc-proto) this client uses, field numbers as
# published: what a client of another language compiled from that file sends and expects.
V1_CLIENT_PROTO = """
name: "client/grpc_reflection_v1.proto"  package: "grpc.reflection.v1"  syntax: "proto3"
message_type {
  name: "ServerReflectionRequest"
  field { name: "host" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "file_by_filename" number: 3 label: LABEL_OPTIONAL type: TYPE_STRING oneof_index: 0 }
  field { name: "file_containing_symbol" number: 4 label: LABEL_OPTIONAL type: TYPE_STRING oneof_index: 0 }
  field { name: "list_services" number: 7 label: LABEL_OPTIONAL type: TYPE_STRING oneof_index: 0 }
  oneof_decl { name: "message_request" }
}
message_type {
  name: "ServerReflectionResponse"
  field { name: "valid_host" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "original_request" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".grpc.reflection.v1.ServerReflectionRequest" }
  field { name: "file_descriptor_response" number: 4 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".grpc.reflection.v1.FileDescriptorResponse" oneof_index: 0 }
  field { name: "list_services_response" number: 6 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".grpc.reflection.v1.ListServiceResponse" oneof_index: 0 }
  field { name: "error_response" number: 7 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".grpc.reflection.v1.ErrorResponse" oneof_index: 0 }
  oneof_decl { name: "message_response" }
}
message_type {
  name: "FileDescriptorResponse"
  field { name: "file_descriptor_proto" number: 1 label: LABEL_REPEATED type: TYPE_BYTES }
}
message_type {
  name: "ListServiceResponse"
  field { name: "service" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".grpc.reflection.v1.ServiceResponse" }
}
message_type {
  name: "ServiceResponse"
  field { name: "name" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
}
message_type {
  name: "ErrorResponse"
  field { name: "error_code" number: 1 label: LABEL_OPTIONAL type: TYPE_INT32 }
  field { name: "error_message" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
}
"""


@pytest.fixture(scope="module")
def v1():
    """The v1 client's file descriptor and its message classes, in a pool of the test's own."""
    proto = text_format.Parse(V1_CLIENT_PROTO, descriptor_pb2.FileDescriptorProto())
    file = descriptor_pool.DescriptorPool().AddSerializedFile(proto.SerializeToString())
    return proto, {name: message_factory.GetMessageClass(d) for name, d in file.message_types_by_name.items()}


def reflect_v1(daemon, v1, requests: list[dict]) -> list:
    """The responses of one v1 ServerReflectionInfo stream, one per request, in order."""
    _, classes = v1
    with grpc.insecure_channel(daemon.target) as channel:
        info = channel.stream_stream(V1_METHOD, request_serializer=classes["ServerReflectionRequest"].SerializeToString,
                                     response_deserializer=classes["ServerReflectionResponse"].FromString)
        return list(info(iter([classes["ServerReflectionRequest"](**r) for r in requests]), timeout=30))


def files(response) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """A file_descriptor_response's files (the file asked for and its dependencies) by name."""
    out = {}
    for blob in response.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
        out[proto.name] = proto
    return out


def test_reflection_v1_lists_the_services_and_resolves_the_contract(daemon, v1):
    requests = [{"list_services": ""}, {"file_containing_symbol": "embtier.v1.EmbeddingStore"},
                {"file_containing_symbol": "embtier.v1.LookupPooledRequest"},
                {"file_by_filename": "embtier/v1/embtier.proto"},
                {"file_containing_symbol": "grpc.reflection.v1.ServerReflection"},
                {"file_containing_symbol": "embtier.v1.NoSuchService"}]
    listed, by_service, by_message, by_file, reflection_file, missing = reflect_v1(daemon, v1, requests)
    assert {s.name for s in listed.list_services_response.service} == SERVICES
    assert listed.original_request.list_services == ""
    contract = descriptor_pb2.FileDescriptorProto.FromString(embtier_pb2.DESCRIPTOR.serialized_pb)
    for response in (by_service, by_message, by_file):
        assert files(response)["embtier/v1/embtier.proto"] == contract  # the daemon's contract, whole
    pool = descriptor_pool.DescriptorPool()
    pool.Add(files(by_service)["embtier/v1/embtier.proto"])
    store = pool.FindServiceByName("embtier.v1.EmbeddingStore")
    assert [m.name for m in store.methods] == [m.name for m in embtier_pb2.DESCRIPTOR.services_by_name[
        "EmbeddingStore"].methods]
    assert store.methods_by_name["LookupPooled"].input_type.full_name == "embtier.v1.LookupPooledRequest"
    # the v1 protocol the daemon describes is the one this client speaks, field for field
    (described,) = files(reflection_file).values()
    assert described.package == "grpc.reflection.v1" and not described.options.deprecated
    assert described.service[0].method[0].client_streaming and described.service[0].method[0].server_streaming
    own, _ = v1
    theirs = {m.name: {f.name: (f.number, f.type, f.type_name) for f in m.field} for m in described.message_type}
    for message in own.message_type:
        for field in message.field:
            assert theirs[message.name][field.name] == (field.number, field.type, field.type_name)
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert missing.original_request.file_containing_symbol == "embtier.v1.NoSuchService"


def test_reflection_v1alpha_still_answers(daemon):
    with grpc.insecure_channel(daemon.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == SERVICES
        store = descriptor_pool.DescriptorPool(database).FindServiceByName("embtier.v1.EmbeddingStore")
        assert store.methods_by_name["WriteRows"].output_type.full_name == "embtier.v1.WriteRowsResponse"
        health = descriptor_pool.DescriptorPool(database).FindServiceByName("grpc.health.v1.Health")
        assert health.methods_by_name["Check"].output_type.full_name == "grpc.health.v1.HealthCheckResponse"
