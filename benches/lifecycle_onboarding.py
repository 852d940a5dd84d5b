"""Onboarding through the gateway against the same DDL straight to ClickHouse (stdlib only)."""

import http.client
import os
import statistics
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

PROJECTS = int(os.environ["PROJECTS"])
CONCURRENCY = int(os.environ["CONCURRENCY"])
ROUNDS = int(os.environ["ROUNDS"])
GATEWAY = urllib.parse.urlsplit(os.environ["GATEWAY"])
CLICKHOUSE = urllib.parse.urlsplit(os.environ["CLICKHOUSE"])
HEADERS = {"Authorization": "Bearer " + os.environ["TOKEN"], "X-Gitlab-Instance-Id": os.environ["INSTANCE"]}
DDL = open("actors/sql/snowplow_events.sql").read()

local = threading.local()


def connection(url):
    key = url.netloc
    conns = getattr(local, "conns", None) or {}
    local.conns = conns
    if key not in conns:
        conns[key] = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    return conns[key]


def request(url, method, path, body=None, headers=None):
    """Every request sent here is idempotent, so one that met a connection the server had
    closed while it was idle is sent again on a new one."""
    for attempt in (1, 2):
        conn = connection(url)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        except (ConnectionError, http.client.RemoteDisconnected):
            conn.close()
            del local.conns[url.netloc]
            if attempt == 2:
                raise


def onboard(project):
    status, body = request(GATEWAY, "PUT", f"/v1/product-analytics/projects/{project}", headers=HEADERS)
    if status not in (200, 201):
        raise SystemExit(f"gateway answered {status}: {body[:300]!r}")


def direct(name):
    for sql in (f"CREATE DATABASE IF NOT EXISTS {name}", DDL.replace("{database}", name).replace("{owner}", "bench")):
        status, body = request(CLICKHOUSE, "POST", "/", body=sql.encode())
        if status != 200:
            raise SystemExit(f"ClickHouse answered {status}: {body[:300]!r}")


PIDS = {name: int(pid) for name, pid in (("clickhouse", os.environ.get("CLICKHOUSE_PID")), ("gateway", os.environ.get("GATEWAY_PID"))) if pid}
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy():
    """Busy and total jiffies of the whole machine so far."""
    with open("/proc/stat") as stat:
        fields = [int(f) for f in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def timed(work, items):
    """Projects per second, and the CPU milliseconds each process spent per project."""
    before = {name: cpu_seconds(pid) for name, pid in PIDS.items()}
    busy_before, total_before = machine_busy()
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(work, items))
    rate = len(items) / (time.perf_counter() - started)
    cpu = {name: (cpu_seconds(pid) - before[name]) * 1000 / len(items) for name, pid in PIDS.items()}
    busy, total = machine_busy()
    cpu["machine busy %"] = 100 * (busy - busy_before) / max(total - total_before, 1)
    return rate, cpu


gateway_rates, direct_rates = [], []
gateway_cpu, direct_cpu = [], []
run = os.getpid()
# Round 0 warms both paths up (a fresh server's first files, the gateway's first tenant) and is
# not counted: on these machines it is often several times slower than the rest.
for round_ in range(ROUNDS + 1):
    first = round_ * PROJECTS + 1
    gateway, gateway_used = timed(onboard, list(range(first, first + PROJECTS)))
    names = [f"bench_direct_{run}_{round_}_{i}" for i in range(PROJECTS)]
    raw, direct_used = timed(direct, names)
    for name in names:
        request(CLICKHOUSE, "POST", "/", body=f"DROP DATABASE IF EXISTS {name}".encode())
    if round_ > 0:
        gateway_rates.append(gateway)
        direct_rates.append(raw)
        gateway_cpu.append(gateway_used)
        direct_cpu.append(direct_used)

g, d = statistics.median(gateway_rates), statistics.median(direct_rates)
print(f"onboarding, {PROJECTS} projects per round, concurrency {CONCURRENCY}, {ROUNDS} rounds (medians)")
print(f"  through the gateway : {g:8.1f} projects/s   rounds: {', '.join(f'{r:.1f}' for r in gateway_rates)}")
print(f"  raw DDL, ClickHouse : {d:8.1f} projects/s   rounds: {', '.join(f'{r:.1f}' for r in direct_rates)}")
print(f"  ratio gateway/raw   : {g / d:.3f}   (target >= 0.80)")
for name in PIDS:
    g_ms = statistics.median(c[name] for c in gateway_cpu)
    d_ms = statistics.median(c[name] for c in direct_cpu)
    print(f"  CPU ms per project, {name:10}: {g_ms:.2f} through the gateway, {d_ms:.2f} raw")
g_busy = statistics.median(c["machine busy %"] for c in gateway_cpu)
d_busy = statistics.median(c["machine busy %"] for c in direct_cpu)
print(f"  machine busy        : {g_busy:.0f}% through the gateway, {d_busy:.0f}% raw")
