"""Installed packages that must agree with each other (an install-order accident shows up here
rather than as a sidecar that cannot start with tracing on)."""

from __future__ import annotations


def test_the_otlp_exporter_finds_its_protos():
    # xds-protos ships an older copy of opentelemetry/proto; scripts/setup reinstalls opentelemetry-proto last
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

    assert OTLPSpanExporter and InstrumentationScope


def test_envoys_modules_that_import_opentelemetry_protos_still_load():
    from envoy.config.trace.v3 import opentelemetry_pb2
    from envoy.extensions.access_loggers.open_telemetry.v3 import logs_service_pb2

    assert logs_service_pb2.DESCRIPTOR and opentelemetry_pb2.OpenTelemetryConfig
