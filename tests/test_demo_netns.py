"""The netns demo: real meshnode processes, one network namespace each, real nftables (root only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("nft") is None or shutil.which("ip") is None, reason="needs nft and ip"),
]


def test_netns_demo_tour(tmp_path):
    report = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "meshnode.cli", "demo", "--nodes", "4", "--regions", "2", "--netns", "--once",
         "--json", str(report), "--dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["all_converged"] is True and data["nodes"] == 4 and data["regions"] == 2
    names = [s["name"] for s in data["steps"]]
    assert names == ["publish-v1", "enforcement-check", "authority-outage-v2", "partition-v3", "heal"]
    assert "connects (allowed by web-to-app)" in proc.stdout and "refused (no rule)" in proc.stdout
    # The lab cleaned up after itself.
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pmdemo" not in left
