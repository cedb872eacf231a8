"""What ships: the daemon's dependencies, and the container image and DaemonSet that must agree."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from meshnode.cli.meshnode import build_parser

ROOT = Path(__file__).resolve().parents[1]
PLOTTING = ("matplotlib", "tqdm", "numpy", "PIL")


def _entrypoint() -> list[str]:
    text = (ROOT / "deploy" / "Containerfile").read_text()
    m = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert m, "Containerfile has no exec-form ENTRYPOINT"
    argv: list[str] = json.loads(m.group(1))
    return argv


def _daemonset() -> dict:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "daemonset.yaml").read_text()))
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    return ds


def _daemonset_argv() -> list[str]:
    """The command line Kubernetes runs: `command` replaces the ENTRYPOINT, `args` are appended."""
    (container,) = _daemonset()["spec"]["template"]["spec"]["containers"]
    argv = list(container.get("command") or _entrypoint())
    return argv + list(container.get("args") or [])


def test_daemonset_runs_the_image_entrypoint_as_a_valid_meshnode_command_line() -> None:
    argv = _daemonset_argv()
    assert argv[0] == "meshnode", argv
    args = build_parser().parse_args(argv[1:])  # exits 2 (a crash loop) on a bad command line
    assert args.cmd == "run" and args.config == "/etc/policymesh/node.toml"


def test_the_daemon_and_meshctl_import_no_plotting_stack() -> None:
    code = ("import sys, meshnode.daemon, meshnode.cli.meshctl, meshnode.cli.meshnode, meshnode.enforcer\n"
            f"print([m for m in {PLOTTING!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_plotting_is_an_extra_not_a_dependency() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(meta["dependencies"]).lower()
    assert not any(p.lower() in deps for p in PLOTTING), meta["dependencies"]
    sim = " ".join(meta["optional-dependencies"]["sim"]).lower()
    assert "matplotlib" in sim and "tqdm" in sim


def test_every_command_has_version() -> None:
    for mod, prog in (("meshnode.cli", "meshctl"), ("meshnode.cli.meshnode", "meshnode"), ("simulations.cli", "meshsim")):
        out = subprocess.run([sys.executable, "-m", mod, "--version"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert re.fullmatch(rf"{prog} \(policymesh\) \S+\n", out.stdout), out.stdout


def test_daemonset_validates_offline_against_the_kubernetes_schema() -> None:
    out = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict",
                          str(ROOT / "deploy" / "daemonset.yaml")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_daemonset_is_hardened_and_runs_everywhere() -> None:
    pod = _daemonset()["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/policymesh"]["readOnly"] is True  # identity and secrets: read-only
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_old_flat_protocol_paths_still_import_the_same_objects() -> None:
    """protocol/ was grouped into trust/, channel/, gossip/; scripts using the old paths keep working."""
    import importlib

    from protocol._moved import MOVED

    for old, new in MOVED.items():
        moved, real = importlib.import_module(old), importlib.import_module(new)
        public = [n for n in dir(real) if not n.startswith("_")]
        assert public, new
        for name in public:
            assert getattr(moved, name) is getattr(real, name), (old, name)
    from protocol.channel import SecureSession
    from protocol.channel.session import SecureSession as session_class
    from protocol.trust import TrustedState
    from protocol.trust.state import TrustedState as state_class

    assert SecureSession is session_class and TrustedState is state_class
