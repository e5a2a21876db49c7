#!/usr/bin/env python3
"""The bench's floor: the sidecar's gRPC stack with nothing in it.

Serves envoy.service.auth.v3.Authorization/Check (always OK) and
envoy.service.ext_proc.v3.ExternalProcessor/Process (CONTINUE on every message) on grpc.aio,
with the same server options as extproc's worker and prebuilt replies, and nothing else: no
health service, no reflection, no metrics, no policy. What `scripts/bench` measures against it
is the cost of Python gRPC itself, the part no code of ours can remove; the gap between a
floor variant and its extproc twin is what our code costs. Both register Check and Process as
grpc.aio registered methods and nothing else (extproc's other services are generic ones:
extproc/app.py `GenericOnly`), so both pay the same per call for that.

    .venv/bin/python scripts/bench_floor.py --port 50100
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.rpc import status_pb2

_OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0),
                                      ok_response=external_auth_pb2.OkHttpResponse())
_CONTINUE = {
    "request_headers": ep.ProcessingResponse(request_headers=ep.HeadersResponse()),
    "response_headers": ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
    "request_body": ep.ProcessingResponse(request_body=ep.BodyResponse()),
    "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
    "request_trailers": ep.ProcessingResponse(request_trailers=ep.TrailersResponse()),
    "response_trailers": ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
}


class FloorAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request, context):
        return _OK


class FloorProcessor(ep_grpc.ExternalProcessorServicer):
    async def Process(self, request_iterator, context):
        # Envoy resets each finished stream: the resulting CancelledError is left to grpc
        async for msg in request_iterator:
            yield _CONTINUE[msg.WhichOneof("request")]


async def serve(host: str, port: int) -> int:
    # the options extproc's worker uses (extproc/app.py), so only the servicers differ
    server = grpc.aio.server(
        maximum_concurrent_rpcs=512,
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                 ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(FloorAuthorization(), server)
    ep_grpc.add_ExternalProcessorServicer_to_server(FloorProcessor(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        print(f"bench_floor: cannot listen on {host}:{port}", file=sys.stderr)
        return 1
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench_floor: listening on {host}:{bound}", file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop(0.5)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="always-allow / always-continue gRPC floor for scripts/bench")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    return asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
