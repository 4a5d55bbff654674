"""Generated gRPC code for proto package ``clipserve.v1`` (``python -m clipserve.server.codegen``).

Import the modules from here: ``from clipserve.server.v1 import clipserve_pb2, clipserve_pb2_grpc``.
"""
