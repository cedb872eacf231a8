"""Node configuration: the shipped examples load; weakening a protection needs its named override."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshnode.config import ConfigError, load_config, render_config
from meshnode.examples import sample_policy_toml
from protocol.trust import parse_policy_toml

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


BASE = render_config(cluster="c", node_id="n1", region="r1", listen="127.0.0.1:7946", advertise="127.0.0.1:7946",
                     seeds=[], admin_listen="127.0.0.1:9946")


def test_examples_are_true_to_the_code():
    lc = load_config(ROOT / "deploy" / "examples" / "node.toml")
    assert lc.cfg.enforce.backend == "nftables" and lc.active_overrides() == []
    assert lc.cfg.mesh.max_channels_per_peer == 2 and lc.cfg.mesh.preauth_max == 256
    policy = (ROOT / "deploy" / "examples" / "policy.toml").read_text()
    assert policy == sample_policy_toml()  # one copy: the example is the sample the code uses
    doc, rev = parse_policy_toml(policy)
    assert [r.name for r in doc.allow] == ["web-to-app", "app-to-db"]
    # the rule shapes shown as comments parse too once uncommented
    shown = "\n".join(line.removeprefix("# ") for line in policy.split("# More rule shapes")[1].splitlines()[1:])
    doc, rev = parse_policy_toml(policy + shown)
    assert [r.name for r in doc.allow] == ["web-to-app", "app-to-db", "monitoring", "ssh-from-ops"]
    assert doc.allow[3].mode == "log" and rev.nodes == ("node-17",)


def test_enroll_template_loads(tmp_path):
    lc = load_config(write(tmp_path, BASE))
    assert lc.cfg.node.id == "n1" and lc.resolve("state") == tmp_path / "state"


def test_unknown_key_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown field `colour`"):
        load_config(write(tmp_path, BASE.replace("[mesh]", "[mesh]\ncolour = 'blue'")))


def test_file_backend_needs_override(tmp_path):
    with pytest.raises(ConfigError, match="allow_file_backend"):
        load_config(write(tmp_path, BASE.replace('backend = "nftables"', 'backend = "file"')))
    text = BASE.replace('backend = "nftables"', 'backend = "file"').replace(
        "allow_file_backend = false", "allow_file_backend = true")
    assert load_config(write(tmp_path, text)).active_overrides() == ["allow_file_backend"]


def test_admin_off_loopback_needs_override(tmp_path):
    text = BASE.replace('listen = "127.0.0.1:9946"', 'listen = "0.0.0.0:9946"')
    with pytest.raises(ConfigError, match="admin_non_loopback"):
        load_config(write(tmp_path, text))


def test_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config(write(tmp_path, BASE.replace('seeds = []', 'seeds = ["nohost"]')))
    with pytest.raises(ConfigError, match="gossip"):
        load_config(write(tmp_path, BASE + "\n[gossip]\nno_such_timer = 5\n"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "cluster = "))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")



def test_validate_section(tmp_path):
    lc = load_config(write(tmp_path, BASE + '\n[validate]\nexpected_listeners = ["tcp/5432", "UDP/53"]\n'))
    assert lc.cfg.validate.expected_listeners == ["tcp/5432", "UDP/53"] and lc.cfg.validate.block_abusers_s == 0
    assert load_config(write(tmp_path, BASE)).cfg.validate.port_audit_s == 60
    for bad, match in (('expected_listeners = ["http"]', "expected_listeners"), ("port_audit_s = 1", "port_audit_s"),
                       ("block_abusers_s = -1", "block_abusers_s"), ("abuse_threshold = 0", "abuse_threshold")):
        with pytest.raises(ConfigError, match=match):
            load_config(write(tmp_path, BASE + f"\n[validate]\n{bad}\n"))
    iptables = BASE.replace('backend = "nftables"', 'backend = "iptables"')
    assert load_config(write(tmp_path, iptables)).cfg.validate.block_abusers_s == 0
    with pytest.raises(ConfigError, match="needs enforce.backend"):
        load_config(write(tmp_path, iptables + "\n[validate]\nblock_abusers_s = 60\n"))


def test_peer_probe_settings(tmp_path):
    lc = load_config(write(tmp_path, BASE))
    v = lc.cfg.validate
    assert v.peer_probes and v.peer_probe_interval_s == 30 and v.unreachable_after_s == 120
    assert 22 in v.peer_probe_ports and lc.active_overrides() == []
    off = load_config(write(tmp_path, BASE + "\n[validate]\npeer_probes = false\n"))
    assert off.active_overrides() == ["validate.peer_probes_off"]  # switched off only as a labelled override
    for bad, match in (("peer_probe_interval_s = 1", "peer_probe_interval_s"),
                       ("peer_probe_targets = 0", "peer_probe_targets"), ("peer_probe_refused = 99", "peer_probe_refused"),
                       ("peer_probe_timeout_s = 0", "peer_probe_timeout_s"),
                       ("peer_probe_ports = [0]", "peer_probe_ports"), ("unreachable_after_s = 3", "unreachable_after_s")):
        with pytest.raises(ConfigError, match=match):
            load_config(write(tmp_path, BASE + f"\n[validate]\n{bad}\n"))
    assert load_config(write(tmp_path, BASE + "\n[validate]\nunreachable_after_s = 0\n")).cfg.validate.unreachable_after_s == 0


def test_port_scan_settings(tmp_path):
    v = load_config(write(tmp_path, BASE)).cfg.validate
    assert (v.port_scan_ports, v.port_scan_window_s) == (20, 60)  # on by default
    off = load_config(write(tmp_path, BASE + "\n[validate]\nport_scan_ports = 0\n")).cfg.validate
    assert off.port_scan_ports == 0
    for bad in ("port_scan_ports = 1", "port_scan_ports = -3", "port_scan_ports = 70000"):
        with pytest.raises(ConfigError, match="port_scan_ports"):
            load_config(write(tmp_path, BASE + f"\n[validate]\n{bad}\n"))
    for bad in ("port_scan_window_s = 5", "port_scan_window_s = 4000"):
        with pytest.raises(ConfigError, match="port_scan_window_s"):
            load_config(write(tmp_path, BASE + f"\n[validate]\n{bad}\n"))
    # nftables only: the iptables backend loads the default (on) and renders no record sets
    from meshnode.enforcer import render_options
    iptables = BASE.replace('backend = "nftables"', 'backend = "iptables"')
    assert render_options(load_config(write(tmp_path, iptables))).port_scan_window_s == 0
    assert render_options(load_config(write(tmp_path, BASE))).port_scan_window_s == 60
    assert render_options(load_config(write(tmp_path, BASE + "\n[validate]\nport_scan_ports = 0\n"))).port_scan_window_s == 0
