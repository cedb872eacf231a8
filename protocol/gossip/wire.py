"""Gossip wire messages: one tagged union of msgspec structs (MessagePack), decoded with a size cap.

Every message a node sends to a peer is one ``Message``; the Noise channel carries it as one
application message.  Structs are ``array_like`` (positional, compact) with small integer tags.
Decoding untrusted bytes validates types in one step; any failure is a :class:`RemoteProtocolError`.

Signed member payloads (``MemberRecord``, ``StatusBody``) use the ``member`` envelope domain
(``protocol.trust.signing``): records travel as full envelopes (they carry the member's certificate),
status travels as ``Status(payload, sig)``, the same domain-separated signature without the envelope
framing, because it is small and frequent.  A record about a member the receiver knows may travel as
``AliveRef``: its fields and signature, the certificate named by a hash; the receiver rebuilds the exact
signed envelope around the certificate it holds (``protocol.gossip.record_refs``).  Only members whose
own record lists ``READS_RECORD_REFS`` in its ``features`` are sent one: a release before them cannot
decode the item.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import msgspec

from protocol.errors import RemoteProtocolError

MAX_MESSAGE_BYTES = (1 << 20) + (64 << 10)  # one policy envelope (1 MiB cap) plus framing
MAX_RECORD_BYTES = 8 << 10  # one signed member record (certificate included)
MAX_STATUS_BYTES = 8 << 10  # one status item (payload and signature)
MAX_INCARNATION = (1 << 64) - 1  # the largest integer MessagePack carries: incarnations saturate here
MAX_GOSSIP_ITEMS = 64
MAX_BATCH = 4096  # records/entries/ids in one message
HASH_PREFIX = 8  # bytes of a SHA-256 kept in digests of member state and status
MAX_VALIDATIONS = 16  # probe reports in one status: the peers its member validated most recently
MAX_REPORT_PORTS = 8  # ports listed per finding of one probe report
SEVERITIES = ("critical", "error", "warning", "info")  # the order of StatusBody.alerts_open
MAX_NODE_ID_CHARS = 64  # a node id (NAME_RE): the names a rumour carries are kept and relayed
MAX_ADDRESS_CHARS = 255  # an advertised address in an AliveRef (a longer one travels in a full record)
CERT_REF_BYTES = 16  # an AliveRef names its member's certificate by this much of the SHA-256 of its bytes
SIG_BYTES = 64  # an Ed25519 signature
READS_RECORD_REFS = 0x01  # MemberRecord.features: this member decodes AliveRef items

NodeId = Annotated[str, msgspec.Meta(max_length=MAX_NODE_ID_CHARS)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Count = Annotated[int, msgspec.Meta(ge=0, le=(1 << 32) - 1)]


class _S(msgspec.Struct, frozen=True, array_like=True, gc=False):
    pass


# -- signed member payloads (inside a "member" signature domain) ------------------------------------
class MemberRecord(_S, frozen=True, array_like=True, gc=False, tag=1):
    """Who a member is and where to reach it, signed by the member's own identity key.  ``features``:
    the wire features the member reads (bits, ``READS_RECORD_REFS``); added after the first release,
    which ignores it (a trailing field of an array-like struct) and decodes it as 0 from a record that
    lacks it.  ``encode_record`` writes a record without features exactly as the first release did."""

    node_id: str
    incarnation: int
    address: str
    cert: bytes
    left: bool = False
    features: Count = 0


class _MemberRecordV1(_S, frozen=True, array_like=True, gc=False, tag=1):
    """``MemberRecord`` as the first release wrote it (no features): see ``encode_record``."""

    node_id: str
    incarnation: int
    address: str
    cert: bytes
    left: bool


def encode_record(rec: MemberRecord) -> bytes:
    """The signed bytes of a member record: the first release's form when it lists no features."""
    if rec.features:
        return encode(rec)
    return encode(_MemberRecordV1(rec.node_id, rec.incarnation, rec.address, rec.cert, rec.left))


class ProbeReport(_S, frozen=True, array_like=True, gc=False):
    """What a member found when it last probed ``target`` from outside (at wall-clock second ``at``):
    ``checked`` ports answered as the signed policy says; ``holes`` are TCP ports the policy refuses to
    the prober that accepted its connection (an enforcement hole); ``blocked`` are TCP ports the policy
    opens to it (the mesh port included) that were dropped on the way.  A claim of the prober, bounded
    in size, believed only as far as its signature goes."""

    target: NodeId
    at: Count
    checked: Count
    holes: Annotated[tuple[Port, ...], msgspec.Meta(max_length=MAX_REPORT_PORTS)] = ()
    blocked: Annotated[tuple[Port, ...], msgspec.Meta(max_length=MAX_REPORT_PORTS)] = ()


class StatusBody(_S, frozen=True, array_like=True, gc=False, tag=2):
    """What a member *enforces* (``serial``, ``policy_hash`` prefix, ``ruleset_hash`` prefix: from
    its enforcer's confirmation), its ``state``, and separately what it merely trusts
    (``trusted_serial``, ``trusted_hash`` prefix).  ``equivocation`` lists the hash prefixes of the
    validly signed payloads it saw for ``equivocation_serial`` (lowest first; empty: none).
    ``validations``: its latest external probe of each peer it validated (newest first);
    ``alerts_open``: its open alerts per severity (critical, error, warning, info).  Both were added
    after the first release: a status without them decodes with them empty, and a node of that
    release ignores them (trailing fields of an array-like struct); their size is capped by type."""

    node_id: str
    seq: int
    serial: int
    policy_hash: bytes
    ruleset_hash: bytes
    state: str
    trusted_serial: int = 0
    trusted_hash: bytes = b""
    equivocation_serial: int = 0
    equivocation: tuple[bytes, ...] = ()
    validations: Annotated[tuple[ProbeReport, ...], msgspec.Meta(max_length=MAX_VALIDATIONS)] = ()
    alerts_open: Annotated[tuple[Count, ...], msgspec.Meta(max_length=len(SEVERITIES))] = ()


class _StatusBodyV1(_S, frozen=True, array_like=True, gc=False, tag=2):
    """``StatusBody`` as the first release wrote it (no validation summary): see ``encode_status``."""

    node_id: str
    seq: int
    serial: int
    policy_hash: bytes
    ruleset_hash: bytes
    state: str
    trusted_serial: int
    trusted_hash: bytes
    equivocation_serial: int
    equivocation: tuple[bytes, ...]


def encode_status(body: StatusBody) -> bytes:
    """The signed bytes of a status.  One without a validation summary is written exactly as the first
    release wrote it (no empty trailing fields): a node that does not validate peers (the simulator's)
    sends the same bytes as before, and every node decodes both forms into ``StatusBody``."""
    if body.validations or body.alerts_open:
        return encode(body)
    return encode(_StatusBodyV1(body.node_id, body.seq, body.serial, body.policy_hash, body.ruleset_hash, body.state,
                                body.trusted_serial, body.trusted_hash, body.equivocation_serial, body.equivocation))


MemberPayload = MemberRecord | StatusBody


# -- piggybacked gossip items ------------------------------------------------------------------------
class Alive(_S, frozen=True, array_like=True, gc=False, tag=1):
    record: bytes  # encoded member envelope of a MemberRecord


class Suspect(_S, frozen=True, array_like=True, gc=False, tag=2):
    node_id: NodeId
    incarnation: int
    source: NodeId


class Dead(_S, frozen=True, array_like=True, gc=False, tag=3):
    node_id: NodeId
    incarnation: int
    source: NodeId


class Status(_S, frozen=True, array_like=True, gc=False, tag=4):
    payload: bytes  # encoded StatusBody
    sig: bytes


class AliveRef(_S, frozen=True, array_like=True, gc=False, tag=5):
    """A member record without its certificate: the ``MemberRecord`` fields, ``cert_ref`` (the first
    ``CERT_REF_BYTES`` of the SHA-256 of the certificate's bytes) and the member's signature.  Sent only
    to members that read it (``READS_RECORD_REFS``); see ``protocol.gossip.record_refs``."""

    node_id: NodeId
    incarnation: Annotated[int, msgspec.Meta(ge=0)]  # (at most MAX_INCARNATION: a MessagePack integer)
    address: Annotated[str, msgspec.Meta(max_length=MAX_ADDRESS_CHARS)]
    left: bool
    features: Count
    cert_ref: Annotated[bytes, msgspec.Meta(min_length=CERT_REF_BYTES, max_length=CERT_REF_BYTES)]
    sig: Annotated[bytes, msgspec.Meta(min_length=SIG_BYTES, max_length=SIG_BYTES)]


def cert_ref(cert_bytes: bytes) -> bytes:
    """The name of a certificate in an ``AliveRef``: a prefix of the SHA-256 of its exact bytes."""
    return hashlib.sha256(cert_bytes).digest()[:CERT_REF_BYTES]


GossipItem = Alive | Suspect | Dead | Status | AliveRef


class Digest(_S, frozen=True, array_like=True, gc=False):
    """The policy a node holds: serial, SHA-256 of the payload (32 bytes), root version it needs."""

    serial: int
    hash: bytes
    root_version: int

    @property
    def key(self) -> tuple[int, int]:
        """Order of policy versions across a root rotation: (root version, serial). A rotation that
        replaces the policy keys resets the serial floor, so serial alone would not order them."""
        return (self.root_version, self.serial)


class View(_S, frozen=True, array_like=True, gc=False):
    """How the sender sees the receiver (lets a member refute a suspicion or death it never heard of)."""

    incarnation: int
    liveness: str


# -- messages ----------------------------------------------------------------------------------------
class Ping(_S, frozen=True, array_like=True, gc=False, tag=1):
    seq: int
    target: str
    gossip: tuple[GossipItem, ...] = ()
    serial: int = 0  # the sender's policy serial: a missed announce is caught at the next probe
    root_version: int = 0  # ... and the root version its policy was signed under (see Digest.key)


class Ack(_S, frozen=True, array_like=True, gc=False, tag=2):
    seq: int
    gossip: tuple[GossipItem, ...] = ()
    serial: int = 0
    root_version: int = 0


class PingReq(_S, frozen=True, array_like=True, gc=False, tag=3):
    seq: int
    target: str
    address: str
    gossip: tuple[GossipItem, ...] = ()


class Nack(_S, frozen=True, array_like=True, gc=False, tag=4):
    seq: int


class Announce(_S, frozen=True, array_like=True, gc=False, tag=5):
    digest: Digest
    gossip: tuple[GossipItem, ...] = ()


class PolicyPull(_S, frozen=True, array_like=True, gc=False, tag=6):
    serial: int
    hash: bytes


class PolicyPush(_S, frozen=True, array_like=True, gc=False, tag=7):
    envelope: bytes


class RootPull(_S, frozen=True, array_like=True, gc=False, tag=8):
    have_version: int


class RootPush(_S, frozen=True, array_like=True, gc=False, tag=9):
    chain: tuple[bytes, ...]


class Sync(_S, frozen=True, array_like=True, gc=False, tag=10):
    """Push-pull anti-entropy.  ``mhash`` summarises the member directory (node_id, incarnation),
    ``shash`` the members' status (empty: the initiator does not reconcile status this time); the
    responder adds per-bucket hashes (``buckets`` / ``sbuckets``) only for a summary that differs."""

    reply: bool
    digest: Digest | None
    root_version: int
    mhash: bytes
    shash: bytes = b""
    you: View | None = None
    record: bytes | None = None  # the sender's own signed record (joins, retries)
    buckets: tuple[bytes, ...] | None = None
    sbuckets: tuple[bytes, ...] | None = None


class SyncEntries(_S, frozen=True, array_like=True, gc=False, tag=11):
    """(node_id, version) of every member in the listed buckets: the incarnation of its record
    (``status`` false) or the sequence number of its status (``status`` true)."""

    status: bool
    buckets: tuple[int, ...]
    entries: tuple[tuple[str, int], ...]


class MemberPull(_S, frozen=True, array_like=True, gc=False, tag=12):
    records: tuple[str, ...]
    statuses: tuple[str, ...]


class Members(_S, frozen=True, array_like=True, gc=False, tag=13):
    records: tuple[bytes, ...]
    statuses: tuple[Status, ...] = ()


Message = (
    Ping | Ack | PingReq | Nack | Announce | PolicyPull | PolicyPush | RootPull | RootPush | Sync
    | SyncEntries | MemberPull | Members
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_payload_decoder = msgspec.msgpack.Decoder(MemberPayload)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode one message from a peer; raise RemoteProtocolError on anything malformed or oversized."""
    if len(data) > max_bytes:
        raise RemoteProtocolError(f"gossip message of {len(data)} bytes exceeds the {max_bytes}-byte cap")
    try:
        msg = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise RemoteProtocolError(f"malformed gossip message: {exc}") from None
    gossip = getattr(msg, "gossip", ())
    if len(gossip) > MAX_GOSSIP_ITEMS:
        raise RemoteProtocolError(f"{len(gossip)} piggybacked items, over the cap of {MAX_GOSSIP_ITEMS}")
    for field in ("records", "statuses", "entries", "chain"):
        seq = getattr(msg, field, None)
        if seq is not None and len(seq) > MAX_BATCH:
            raise RemoteProtocolError(f"{len(seq)} {field} in one message, over the cap of {MAX_BATCH}")
    return msg


def decode_payload(data: bytes) -> MemberRecord | StatusBody:
    try:
        return _payload_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise RemoteProtocolError(f"malformed member payload: {exc}") from None


def digest_size() -> int:
    """Encoded size of a typical digest (for budgeting)."""
    return len(encode(Digest(1 << 40, b"\0" * 32, 1)))
