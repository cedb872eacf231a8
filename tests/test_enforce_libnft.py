"""The nftables backend through libnftables, in-process, in a namespace of its own (root).

The daemon runs in its own network namespace and, there, loads and reads back rulesets through the
library instead of the ``nft`` tool (``meshnode/enforce/libnft.py``).  This runs the backend that way
inside a fresh namespace (``ip netns exec``) and checks what the kernel then holds against the rendered
hash, the ``nft`` tool's own reading of it, drift detection and repair, and errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import skip_reason

NS = f"pmlibnft{os.getpid() % 100000}"
SCRIPT = r'''
import subprocess, sys
sys.path.insert(0, sys.argv[1])
from tests.test_enforce_backends import KITCHEN_SINK, Scenario, broken
from meshnode.enforce import EnforcementError, NftBackend, ruleset_digest

sc = Scenario()
be = NftBackend("policymesh")
assert be.in_process, "libnftables did not load"
tool = NftBackend("policymesh", in_process=False)
assert not tool.in_process
assert be.read_kernel_hash() is None  # no table yet
small, big = sc.ruleset(), sc.ruleset(KITCHEN_SINK, [sc.b, sc.c, sc.d])
res = be.apply(small)
assert res.exact and res.kernel_hash == ruleset_digest(small).hash == tool.read_kernel_hash(), res
res = be.apply(big, read_back_later=True)  # proven exact: committed, read back by the drift check
assert res.mode == "full" and not res.verified and be.read_back_pending
assert tool.read_kernel_hash() == ruleset_digest(big).hash
d = be.check_drift()
assert d.checked and not d.drifted and not be.read_back_pending
grown = sc.ruleset(KITCHEN_SINK, [sc.b, sc.c])  # fewer members: a set update in place
res = be.apply(grown)
assert res.mode == "sets" and res.kernel_hash == ruleset_digest(grown).hash == tool.read_kernel_hash()
subprocess.run(["nft", "add", "rule", "inet", "policymesh", "input", "tcp", "dport", "4444", "accept"], check=True)
d = be.check_drift()
assert d.drifted and d.repaired, d
assert tool.read_kernel_hash() == ruleset_digest(grown).hash
try:
    be.apply(broken(big))
except EnforcementError as exc:
    assert "libnftables" in str(exc) and "resolve" in str(exc), exc
else:
    raise AssertionError("a ruleset the kernel refuses was accepted")
assert tool.read_kernel_hash() == ruleset_digest(grown).hash  # the refused load left the ruleset in force
be.remove()
assert tool.read_kernel_hash() is None and be.read_kernel_hash() is None
print("ok")
'''


@pytest.mark.root
@pytest.mark.skipif(skip_reason("nft") is not None, reason=str(skip_reason("nft")))
def test_in_process_backend_loads_reads_back_repairs_and_refuses_like_the_tool() -> None:
    root = str(Path(__file__).resolve().parent.parent)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        proc = subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-c", SCRIPT, root],
                              capture_output=True, text=True, timeout=120, check=False)
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
