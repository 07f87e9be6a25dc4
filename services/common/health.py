"""Is a service up: the probes `modalmesh up` waits on and the compose health checks run.

    python -m services.common.health http URL [--timeout S]
    python -m services.common.health grpc HOST:PORT SERVICE [--timeout S]

`http` succeeds on a 2xx answer (the gateway's /health, Triton's /v2/health/ready); `grpc`
when the standard gRPC health service at the target reports SERVICE as SERVING (the LLM
service: "modalmesh.v1.LLM"). Exit 0 when healthy, 1 when not. It lives with the services, not
the CLI, so a service image's health check imports nothing of `modalmesh` but the protobuf
modules; it needs only the standard library and, for `grpc`, grpcio and grpcio-health-checking.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether `url` answers a GET with a 2xx status within `timeout` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def grpc_serving(target: str, service: str, timeout: float = 1.0) -> bool:
    """Whether the standard gRPC health service at `target` reports `service` SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m services.common.health`: 0 when healthy, 1 when not."""
    parser = argparse.ArgumentParser(prog="python -m services.common.health", description=__doc__)
    kinds = parser.add_subparsers(dest="kind", required=True)
    http = kinds.add_parser("http", help="GET a URL; healthy on a 2xx answer")
    http.add_argument("url")
    grpc = kinds.add_parser("grpc", help="the standard gRPC health service; healthy when SERVING")
    grpc.add_argument("target", help="HOST:PORT")
    grpc.add_argument("service", help='the service name, e.g. "modalmesh.v1.LLM"')
    for sub in (http, grpc):
        sub.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    args = parser.parse_args(argv)
    if args.kind == "http":
        healthy = http_ok(args.url, timeout=args.timeout)
    else:
        healthy = grpc_serving(args.target, args.service, timeout=args.timeout)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
