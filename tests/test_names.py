"""Names are validated whole and in ASCII: at enrollment, at signing, and by the verifier.

``$`` matches before a final newline, ``\\d`` and ``str.isdigit`` take non-ASCII digits, and ``ipaddress``
takes any IPv6 scope id: a node id ``evil\\n`` used to get a signed certificate and a node.toml that
check-config refused; a rule name ending in a newline rendered an iptables comment iptables-restore
refused.  Each check here fails on the old patterns.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshnode.cli.meshctl import main as meshctl
from meshnode.config import ConfigError, split_hostport
from protocol.errors import PolicyError, TrustError
from protocol.trust import (
    DAY_S,
    Certificate,
    PolicyVersion,
    TrustedState,
    build_root,
    public_key_of,
    sign_certificate,
    sign_policy,
    sign_root,
)
from protocol.trust.names import is_name, parse_address, parse_network, parse_port_number
from protocol.trust.policy import PolicyDocument, Revocations, Rule, parse_policy_toml, parse_port
from simulations.identities import T0, make_authority, make_node

# Every way a name can look right and not be: line ends, control characters, look-alikes, digits that
# only Unicode calls digits, invisible characters.
BAD_NAMES = [
    "evil\n",
    "evil\r\n",
    "evil\r",
    "ev\nil",
    "\nevil",
    "evil\x00",
    "ev\til",
    "evil\x1b[31m",
    "evil ",
    "еvil",  # Cyrillic 'е'
    "аpp",  # Cyrillic 'а'
    "ｅvil",  # fullwidth 'e'
    "node１",  # fullwidth digit
    "node٣",  # Arabic-Indic digit: \d matches it
    "node\u200b",  # zero-width space
    "node\u212a",  # Kelvin sign: [a-z] with IGNORECASE would match it
    "",
    "-lead",
    "x" * 65,
]
GOOD_NAMES = ["a", "node-1", "eu-west-1", "a.b_c-D9", "x" * 64]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(name):
    assert not is_name(name)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_pass(name):
    assert is_name(name)


@pytest.mark.parametrize("text", ["10.0.0.1\n", "fe80::1%eth0\n", "fe80::1%eth0", "::1%\x00", "::1%а",
                                  "１0.0.0.1", "10.0.0.1 ", "", "10.0.0.1\x00"])
def test_bad_addresses_are_refused(text):
    with pytest.raises(ValueError):
        parse_address(text)


@pytest.mark.parametrize("text", ["10.0.0.0/8\n", "fe80::%eth0/64", "fe80::%eth0\n/64", "１0.0.0.0/8", "10.0.0.0/８"])
def test_bad_prefixes_are_refused(text):
    with pytest.raises(ValueError):
        parse_network(text)


@pytest.mark.parametrize("spec", ["tcp/22\n", "tcp/２２", "tcp/٢٢", "tcp/²", "udp/1-２", "udp/1-2\n", "tcp/ 22",
                                  "tcp/+22", "icmp\n"])
def test_bad_ports_are_refused(spec):
    with pytest.raises(ValueError):
        parse_port(spec)


@pytest.mark.parametrize("text", ["7946\n", "７９４６", "٧٩٤٦", "²", "65536", "-1", ""])
def test_bad_port_numbers_are_refused(text):
    with pytest.raises(ValueError):
        parse_port_number(text)


@pytest.mark.parametrize("value", ["127.0.0.1:7946\n", "127.0.0.1:７９４６", "127.0.0.1:٧٩٤٦", "127.0.0.1\x00:7946"])
def test_config_host_port_is_checked_whole(value):
    with pytest.raises(ConfigError):
        split_hostport(value, "mesh.listen")


# -- enrollment: meshctl node enroll / authority init --------------------------------------------------


@pytest.fixture(scope="module")
def authority(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("names") / "auth"
    assert meshctl(["authority", "init", str(d), "--cluster", "t1"]) == 0
    return d


def _enroll(authority: Path, out: Path, **over: str) -> int:
    args = {"--node-id": "n1", "--region": "eu", "--role": "app", "--address": "10.1.0.5"}
    args.update(over)
    argv = ["node", "enroll", "--authority", str(authority), "--out", str(out), "--backend", "file",
            "--key", str(Path(authority) / "secrets" / "enroll-1-1.key")]
    for k, v in args.items():
        argv.append(f"{k}={v}")  # "=": a value may start with "-"
    return meshctl(argv)


def test_a_good_enrollment_passes(authority, tmp_path):
    assert _enroll(authority, tmp_path / "n") == 0
    assert (tmp_path / "n" / "node.cert").exists() and (tmp_path / "n" / "node.toml").exists()


@pytest.mark.parametrize("flag", ["--node-id", "--region", "--role"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_enrollment_refuses_bad_names_before_signing(authority, tmp_path, capsys, flag, name):
    assert _enroll(authority, tmp_path / "n", **{flag: name}) != 0
    assert "meshctl: error:" in capsys.readouterr().err
    assert not (tmp_path / "n" / "node.cert").exists()


@pytest.mark.parametrize(("flag", "value"), [
    ("--address", "10.1.0.5\n"),
    ("--address", "fe80::1%eth0\n"),
    ("--address", "fe80::1%eth0"),
    ("--address", "１0.1.0.5"),
    ("--seed", "10.1.0.6:7946\n"),
    ("--seed", '10.1.0.6:7946", "x:1'),  # would inject a second seed into node.toml
    ("--seed", "10.1.0.6:７９４６"),
    ("--listen", "0.0.0.0:７９４６"),
    ("--listen", '0.0.0.0:7946"\n[overrides]\nadmin_non_loopback = true\n#'),
    ("--admin-listen", "127.0.0.1:9100\n"),
])
def test_enrollment_refuses_values_that_would_not_survive_node_toml(authority, tmp_path, flag, value):
    assert _enroll(authority, tmp_path / "n", **{flag: value}) != 0
    assert not (tmp_path / "n" / "node.cert").exists()


@pytest.mark.parametrize("name", ["t1\n", "tе", "t１"])
def test_authority_init_refuses_bad_cluster_names(tmp_path, name):
    assert meshctl(["authority", "init", str(tmp_path / "a"), "--cluster", name]) != 0
    assert not (tmp_path / "a" / "root.msgpack").exists()


def test_the_issue_case_end_to_end(tmp_path):
    """The reported case with the real commands: `evil\\n` gets no certificate (so no node.toml that
    check-config refuses)."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "meshnode.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)

    assert run("authority", "init", "auth", "--cluster", "t1").returncode == 0
    proc = run("node", "enroll", "--authority", "auth", "--node-id", "evil\n", "--region", "eu", "--role", "app",
               "--address", "10.1.0.5", "--out", "evil", "--key", "auth/secrets/enroll-1-1.key")
    assert proc.returncode != 0 and "--node-id 'evil\\n'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "evil").exists()


# -- signing: meshctl policy sign ------------------------------------------------------------------

RULE = """
[[allow]]
name = {name}
from = [{src}]
to = [{dst}]
ports = [{port}]
"""
GOOD = {"name": '"app-to-db"', "src": '"role:app"', "dst": '"role:db"', "port": '"tcp/5432"'}
BAD_POLICY_FIELDS = [
    ("name", r'"web\n"'),
    ("name", r'"web\u0000"'),
    ("name", r'"w\teb"'),
    ("name", r'"w\u0435b"'),  # Cyrillic 'е'
    ("name", r'"web\r"'),
    ("src", r'"role:app\n"'),
    ("src", r'"node:n1\r"'),
    ("src", r'"role:\u0430pp"'),
    ("src", r'"cidr:fe80::%eth0/64"'),
    ("src", r'"cidr:10.0.0.0/8\n"'),
    ("dst", r'"role:db\n"'),
    ("dst", r'"node:n\uff11"'),  # fullwidth digit
    ("port", r'"tcp/\uff15432"'),  # fullwidth digit
    ("port", r'"tcp/\u0665432"'),  # Arabic-Indic digit
    ("port", r'"tcp/5432\n"'),
    ("port", r'"udp/1-\u00b2"'),  # superscript two: isdigit() says yes, int() says no
]


def _policy_toml(**over: str) -> str:
    return '[defaults]\ninbound = "drop"\n' + RULE.format(**{**GOOD, **over})


def test_a_good_policy_signs(authority, tmp_path):
    (tmp_path / "p.toml").write_text(_policy_toml())
    assert meshctl(["policy", "sign", str(tmp_path / "p.toml"), "--authority", str(authority),
                    "--key", str(authority / "secrets" / "policy-1-1.key"), "--out", str(tmp_path / "p.msgpack")]) == 0


@pytest.mark.parametrize(("field", "value"), BAD_POLICY_FIELDS)
def test_policy_sign_refuses_bad_names(authority, tmp_path, capsys, field, value):
    (tmp_path / "p.toml").write_text(_policy_toml(**{field: value}))
    with pytest.raises(PolicyError):
        parse_policy_toml((tmp_path / "p.toml").read_text())
    assert meshctl(["policy", "sign", str(tmp_path / "p.toml"), "--authority", str(authority),
                    "--key", str(authority / "secrets" / "policy-1-1.key"), "--out", str(tmp_path / "p.msgpack")]) != 0
    assert "meshctl: error:" in capsys.readouterr().err
    assert not (tmp_path / "p.msgpack").exists()


@pytest.mark.parametrize("item", [r'nodes = ["n1\n"]', r'certs = ["abc\n"]', r'nodes = ["n\u0430"]'])
def test_policy_sign_refuses_bad_revocations(authority, tmp_path, item):
    (tmp_path / "p.toml").write_text(_policy_toml() + f"\n[revoke]\n{item}\n")
    assert meshctl(["policy", "sign", str(tmp_path / "p.toml"), "--authority", str(authority),
                    "--key", str(authority / "secrets" / "policy-1-1.key"), "--out", str(tmp_path / "p.msgpack")]) != 0


# -- verification: envelopes signed with bad names by bypassing the CLI ---------------------------------


def _cert(auth, **over: object) -> bytes:
    good = make_node(auth, "n1").cert
    fields = {f: getattr(good, f) for f in good.__struct_fields__}
    fields.update(over)
    return sign_certificate(Certificate(**fields), auth.seeds["enroll"])  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value"), [
    *[("node_id", n) for n in BAD_NAMES],
    ("region", "eu\n"),
    ("region", "еu"),
    ("roles", ("app\n",)),
    ("roles", ("app", "аpp")),
    ("cert_id", "abc\n"),
    ("cert_id", "ab\x00c"),
    ("addresses", ("10.1.0.5\n",)),
    ("addresses", ("fe80::1%eth0\n",)),
    ("addresses", ("fe80::1%eth0",)),
])
def test_the_verifier_refuses_a_certificate_signed_with_a_bad_name(field, value):
    auth = make_authority()
    trust = TrustedState(auth.root_bytes)
    trust.verify_certificate(_cert(auth), T0)  # the same certificate with good names verifies
    with pytest.raises(TrustError):
        trust.verify_certificate(_cert(auth, **{field: value}), T0)


def _signed_policy(auth, rules: tuple[Rule, ...], rev: Revocations | None = None) -> bytes:
    # Straight to the struct and the signature: build_policy (which validates) is bypassed on purpose.
    pv = PolicyVersion(cluster=auth.cluster, serial=1, issued_at=T0, expires_at=T0 + DAY_S,
                       root_version=auth.root.version, document=PolicyDocument(allow=rules),
                       revocations=rev or Revocations())
    return sign_policy(pv, auth.seeds["policy"])


def _rule(**over: object) -> Rule:
    fields: dict[str, object] = {"name": "app-to-db", "sources": ("role:app",), "to": ("role:db",),
                                 "ports": ("tcp/5432",)}
    fields.update(over)
    return Rule(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", [
    _rule(name="web\n"),
    _rule(name="web\x00"),
    _rule(name="wеb"),
    _rule(name="web\n", sources=("cidr:10.0.0.0/8",)),  # the slow (non-canonical) path too
    _rule(sources=("role:app\n",)),
    _rule(sources=("cidr:fe80::%eth0/64",)),
    _rule(to=("node:n１",)),
    _rule(ports=("tcp/５432",)),
    _rule(ports=("tcp/5432\n",)),
])
def test_the_verifier_refuses_a_policy_signed_with_a_bad_name(rule):
    auth = make_authority()
    trust = TrustedState(auth.root_bytes)
    trust.check_policy(_signed_policy(auth, (_rule(),)), T0)  # the good one verifies
    with pytest.raises(TrustError):
        trust.check_policy(_signed_policy(auth, (rule,)), T0)


@pytest.mark.parametrize("rev", [Revocations(nodes=("n1\n",)), Revocations(certs=("abc\n",)),
                                 Revocations(nodes=("nа",))])
def test_the_verifier_refuses_a_policy_revoking_a_bad_name(rev):
    auth = make_authority()
    with pytest.raises(TrustError):
        TrustedState(auth.root_bytes).check_policy(_signed_policy(auth, (_rule(),), rev), T0)


@pytest.mark.parametrize("cluster", ["t1\n", "tе", "t\x00"])
def test_a_root_with_a_bad_cluster_name_is_not_trusted(cluster):
    auth = make_authority()
    pubs = {role: [public_key_of(s) for s in seeds] for role, seeds in auth.seeds.items()}
    root = build_root(cluster, 1, T0 + DAY_S, pubs, auth.thresholds)
    with pytest.raises(TrustError):
        TrustedState(sign_root(root, auth.seeds["root"]))
