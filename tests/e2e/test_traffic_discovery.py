"""envoy/examples/discovery.yaml through the real Envoy: a STRICT_DNS cluster and file-based EDS.

The example runs as shipped, its ports rewritten and its EDS path pointed at a temporary copy
of envoy/examples/discovery.eds.yaml (ports rewritten the same way). Proven: the STRICT_DNS
cluster reaches the replica by name (`localhost`), and an endpoint added to the EDS file (an
atomic rename, as the example says) receives traffic without a restart, and one removed stops.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_traffic_lb import Example, replicas_of
from tests.support.procs import ROOT, wait_until
from tests.support.stack import rewrite_ports

pytestmark = pytest.mark.e2e

BOOTSTRAP = ROOT / "envoy" / "examples" / "discovery.yaml"
EDS_START = ROOT / "envoy" / "examples" / "discovery.eds.yaml"
EDS_PATH = "/etc/envoy/eds/webshop.yaml"
LISTENER, ADMIN, R1, R2 = 8000, 9901, 18081, 18082


def write_eds(ex: Example, ports: list[int], version: int) -> None:
    """Replace the EDS file atomically (write a temporary file, rename it over)."""
    doc = rewrite_ports(yaml.safe_load(EDS_START.read_text()), ex.map)
    doc["version_info"] = str(version)
    doc["resources"][0]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ex.port(p)}}}}
        for p in ports]
    tmp = ex.eds.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, ex.eds)


@pytest.fixture(scope="module")
def disc(tmp_path_factory):
    base: Path = tmp_path_factory.mktemp("traffic-discovery")
    ex = Example(base, BOOTSTRAP, [LISTENER, ADMIN, R1, R2])
    ex.eds = base / "eds" / "webshop.yaml"
    ex.eds.parent.mkdir()
    try:
        ex.start_replica(R1, "r1")
        ex.start_replica(R2, "r2")
        ex.eds.write_text(json.dumps(rewrite_ports(yaml.safe_load(EDS_START.read_text()), ex.map)))

        def edit(doc: dict) -> None:
            for c in doc["static_resources"]["clusters"]:
                if c["name"] == "by_file":
                    source = c["eds_cluster_config"]["eds_config"]["path_config_source"]
                    assert source["path"] == EDS_PATH
                    source["path"] = str(ex.eds)
        ex.start_envoy(edit)
        yield ex
    finally:
        ex.stop()


def test_strict_dns_cluster_resolves_the_name(disc):
    assert replicas_of(disc.port(LISTENER), "/dns/echo/headers", 5) == Counter({"r1": 5})
    assert disc.stat("cluster.by_dns.membership_total") == 1          # localhost, IPv4 only


def test_an_endpoint_added_to_the_eds_file_receives_traffic(disc):
    port = disc.port(LISTENER)
    assert replicas_of(port, "/eds/echo/headers", 6) == Counter({"r1": 6})   # the shipped starting file
    write_eds(disc, [R1, R2], version=2)
    wait_until(lambda: disc.stat("cluster.by_file.membership_total") == 2, timeout=10, what="EDS file reloaded")
    wait_until(lambda: "r2" in replicas_of(port, "/eds/echo/headers", 2), timeout=5, what="r2 taking traffic")
    assert replicas_of(port, "/eds/echo/headers", 10) == Counter({"r1": 5, "r2": 5})
    write_eds(disc, [R2], version=3)                                   # and one removed stops
    wait_until(lambda: disc.stat("cluster.by_file.membership_total") == 1, timeout=10, what="EDS file reloaded")
    wait_until(lambda: replicas_of(port, "/eds/echo/headers", 4) == Counter({"r2": 4}), timeout=5,
               what="r1 out of rotation")
