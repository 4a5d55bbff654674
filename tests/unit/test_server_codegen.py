"""The committed gRPC code in server/v1 is what the pinned grpcio-tools makes from the .proto."""

import pytest

codegen = pytest.importorskip("clipserve.server.codegen")


def test_generated_code_is_current():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the code")
    stale = codegen.stale_files()
    assert not stale, f"stale: {stale}; run python -m clipserve.server.codegen"


def test_generated_code_imports_as_subpackage():
    from clipserve.server.v1 import clipserve_pb2, clipserve_pb2_grpc

    services = set(clipserve_pb2.DESCRIPTOR.services_by_name)
    assert services == {"EmbeddingService", "ClassificationService", "ModelService",
                        "FeedbackService"}
    assert clipserve_pb2.DESCRIPTOR.package == "clipserve.v1"
    assert hasattr(clipserve_pb2_grpc, "EmbeddingServiceStub")
