"""`benchmarks/serve_cpu.py`'s parts that need no server: roles from Ray's process titles, CPU
times from /proc, the per-role sums and the report's rows."""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("aiohttp")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("serve_cpu_bench", ROOT / "benchmarks" / "serve_cpu.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

linux = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@pytest.mark.parametrize("title, expected", [
    ("ray::ProxyActor", "proxy"),
    ("ray::ServeReplica:dfastllm:OpenAIIngress", "ingress"),
    ("ray::ServeReplica:dfastllm:OpenAIIngress.handle_request", "ingress"),
    ("ray::ServeReplica:dfastllm:Batcher-tiny-llada", "batcher"),
    ("ray::ServeReplica:dfastllm:ModelReplica-tiny-dream", "replica"),
    ("ray::ServeController.listen_for_change", "ray"),
    ("ray::IDLE", "ray"),
])
def test_role_from_title(title, expected):
    assert bench.role(title) == expected


@linux
def test_cpu_seconds_grows_with_work_and_is_zero_for_a_gone_pid():
    before = bench.cpu_seconds(os.getpid())
    start = time.process_time()
    while time.process_time() - start < 0.1:      # spend 0.1 s of CPU, however long it takes
        sum(range(1000))
    assert bench.cpu_seconds(os.getpid()) - before >= 0.05
    assert bench.cpu_seconds(2 ** 22 + 12345) == 0.0     # above Linux's largest pid


def test_by_role_sums_per_role_and_ignores_a_process_gone_meanwhile():
    titles = {1: "ray::ServeReplica:a:Batcher-m", 2: "ray::ServeReplica:a:Batcher-n",
              3: "ray::ProxyActor", 4: "ray::ServeReplica:a:ModelReplica-m"}
    before = {1: 1.0, 2: 2.0, 3: 0.5, 4: 10.0}
    after = {1: 1.5, 2: 2.25, 3: 1.0}              # pid 4 exited: counts 0, not a negative
    spent = bench.by_role(before, after, titles)
    assert spent["batcher"] == pytest.approx(0.75)
    assert spent["proxy"] == pytest.approx(0.5)
    assert spent["replica"] == 0.0 and spent["client"] == 0.0


def test_report_row_gives_ms_per_request_and_the_batchers_share(capsys):
    cpu = {"proxy": 1.0, "ingress": 2.0, "batcher": 1.0, "replica": 6.0, "ray": 0.0,
           "client": 3.0}
    graph = {"direct": False, "wall": 10.0, "completed": 100, "tok_s": 280.0, "lost": 0,
             "cpu": cpu}
    direct = {**graph, "direct": True, "tok_s": 308.0, "cpu": {**cpu, "batcher": 0.0}}
    line = bench.row(graph, 1)
    # 10 ms of proxy per request, ..., 100 ms of serving CPU in all, the batcher 10 % of it
    assert "| graph | 1 | 100 | 0 | 280.0 | 10.0 | 20.0 | 10.0 | 60.0 | 0.0 | 30.0 | 100.0 | 10.0 % |" == line
    bench.print_report([(1, graph), (1, direct)])
    assert "direct / graph 1.10" in capsys.readouterr().out
