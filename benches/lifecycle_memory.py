"""Resident memory of a gateway before and after many instances each made one call."""

import http.client
import os
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

GATEWAY = urllib.parse.urlsplit(os.environ["GATEWAY"])
PID = int(os.environ["GATEWAY_PID"])
IDLE = int(os.environ["IDLE_SECONDS"])
DECAY = int(os.environ["DECAY_SECONDS"])
CACHE = os.environ.get("TOKEN_CACHE", "on")
CONCURRENCY = int(os.environ["CONCURRENCY"])
instances = open(os.environ["INSTANCES_FILE"]).read().split()
tokens = open(os.environ["TOKENS_FILE"]).read().split()
assert len(instances) == len(tokens)

local = threading.local()


def rss_bytes():
    for line in open(f"/proc/{PID}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmRSS")


def call(pair):
    instance, token = pair
    conn = getattr(local, "conn", None)
    if conn is None:
        conn = local.conn = http.client.HTTPConnection(GATEWAY.hostname, GATEWAY.port, timeout=60)
    conn.request("GET", "/v1/product-analytics/projects",
                 headers={"Authorization": "Bearer " + token, "X-Gitlab-Instance-Id": instance})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"gateway answered {response.status}")


# Warm up with one instance, so the baseline includes pools and lazily built state.
call((instances[0], tokens[0]))
time.sleep(1)
base = rss_bytes()
started = time.perf_counter()
with ThreadPoolExecutor(CONCURRENCY) as pool:
    list(pool.map(call, list(zip(instances, tokens))[1:]))
elapsed = time.perf_counter() - started
alive = rss_bytes()


def tenant_actors():
    metrics = http.client.HTTPConnection(GATEWAY.hostname, int(os.environ["ADMIN_PORT"]), timeout=10)
    metrics.request("GET", "/metrics")
    lines = metrics.getresponse().read().decode().splitlines()
    values = [line.split()[-1] for line in lines if line.startswith("monitor_gateway_tenant_actors ")]
    return float(values[0]) if values else None


# The actors stop within 1.5 idle timeouts of their call; then the allocator returns the pages
# they freed within its decay time.
deadline = time.monotonic() + IDLE * 3 + 5
while tenant_actors() != 0 and time.monotonic() < deadline:
    time.sleep(0.5)
time.sleep(DECAY + 1)
idle = rss_bytes()
actors = tenant_actors()

n = len(instances) - 1
print(f"idle tenants, verified-token cache {CACHE}: {n} instances, one call each ({n / elapsed:.0f} calls/s)")
print(f"  RSS before                  : {base / 2**20:8.1f} MiB")
print(f"  RSS with their actors alive : {alive / 2**20:8.1f} MiB   {(alive - base) / n:8.0f} bytes per instance")
print(f"  RSS after they idled out    : {idle / 2**20:8.1f} MiB   {(idle - base) / n:8.0f} bytes per instance (target < 2048)")
print(f"  tenant actors running then  : {'unknown' if actors is None else f'{actors:.0f}'}")
