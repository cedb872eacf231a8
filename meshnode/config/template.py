"""The node.toml that ``meshctl node enroll`` writes: a working config with secure defaults."""

from __future__ import annotations

from collections.abc import Mapping


def render_config(
    *,
    cluster: str,
    node_id: str,
    region: str,
    listen: str,
    advertise: str,
    seeds: list[str],
    admin_listen: str,
    backend: str = "nftables",
    allow_file_backend: bool = False,
    source_address: str = "",
    gossip: Mapping[str, int] | None = None,
) -> str:
    """The node.toml that `meshctl node enroll` writes: a working config with secure defaults.

    ``source_address`` (the local IP to dial peers from) and ``gossip`` (overrides of the gossip
    timers, in ms) are written only when given."""
    seeds_s = ", ".join(f'"{s}"' for s in seeds)
    source_line = f'\nsource_address = "{source_address}"' if source_address else ""
    gossip_section = "".join(f"\n{key} = {int(value)}" for key, value in (gossip or {}).items())
    gossip_section = f"\n[gossip]{gossip_section}\n" if gossip_section else ""
    return f"""# policymesh node configuration, written by `meshctl node enroll`.
# Paths are relative to this file. Unknown keys are errors.
cluster = "{cluster}"

[node]
id = "{node_id}"
region = "{region}"
data_dir = "state"            # trusted roots and last-known-good policy (exact signed bytes)

[identity]
cert = "node.cert"
identity_key = "secrets/identity.key"
static_key = "secrets/static.key"

[trust]
root = "root.msgpack"         # the pinned trust anchor (authority root metadata)
clock_skew_s = 300

[mesh]
listen = "{listen}"
advertise = "{advertise}"{source_line}
seeds = [{seeds_s}]

[admin]
listen = "{admin_listen}"     # /healthz /readyz /v1/status /metrics; loopback only unless overridden

[enforce]
backend = "{backend}"         # nftables | iptables | file (file enforces nothing: needs an override)
table = "policymesh"
icmp = true
drift_check_s = 30
mesh_join_cidrs = ["0.0.0.0/0", "::/0"]  # new members join from here; Noise authenticates every connection

[sources]
urls = []                     # plain HTTP(S) URLs serving signed policy envelopes
poll_s = 60
drop_dir = ""                 # a directory watched for signed policy files (air-gapped hosts)

[overrides]
# Each switch here weakens a protection; active ones are logged at start, shown in status and metrics.
allow_file_backend = {"true" if allow_file_backend else "false"}
admin_non_loopback = false
break_glass_cidrs = []
{gossip_section}"""
