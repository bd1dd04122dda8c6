"""`benchmarks/sdar_offline.py` on the fixture's tiny SDAR, 3 requests: all three paths return
the same tokens, separate takes the reference's forwards and fused one fewer per block."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_paths_agree_and_fused_saves_the_storing_forwards():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sdar_offline.py"),
                          "--batch", "3", "--gen-len", "8", "--prompt-len", "6",
                          "--strategy", "sequential", "--no-progress"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]]
            for line in out.splitlines() if "|" in line and not line.startswith(" " * 6 + "path")}
    assert rows["separate"][-2] == rows["fused"][-2] == "yes", out
    # prompt 6, block 4: blocks 4..8 (the prompt's 2-token tail + 2 masks), 8..12, 12..16;
    # sequential, 1 per step: 1 prefill + (2 + 1 store) + 2 x (4 + 1 store)
    assert float(rows["reference"][1]) == float(rows["separate"][1]) == 14.0, out
    assert float(rows["fused"][1]) == 10.0, out            # no prefill, no storing forwards
