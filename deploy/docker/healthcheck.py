"""Container health check: the standard grpc.health.v1 Check of the cortexlens server.

    python deploy/docker/healthcheck.py [HOST:PORT]     # default 127.0.0.1:$CORTEXLENS_GRPC_PORT

Exit 0 when the server answers SERVING, 1 otherwise (Docker's HEALTHCHECK contract). The check
goes through Serve's gRPC proxy to the Ingress, which asks the decoder for its model, so SERVING
means a model is loaded and a request can be decoded.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = (
        argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('CORTEXLENS_GRPC_PORT', '9000')}"
    )
    try:
        with grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=4.0
            )
    except grpc.RpcError as e:
        print(f"{target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{target}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
