"""Member records relayed without their certificate (``AliveRef``), and rebuilt by the receiver.

A signed member record carries the member's certificate (about 350 of its ~520 bytes).  After churn
(a leave, a refutation) every node relays the member's new record ``retransmit_limit`` times, nearly
always to nodes that hold that certificate already, in the member's previous record.  So a record
about a member whose certificate is unchanged travels as an ``AliveRef``: the record's fields, the
member's signature, and ``cert_ref``, a hash naming the certificate.  The receiver takes the
certificate from the record it holds for that member, rebuilds the exact signed envelope
(``rebuild``), and verifies it as any record: the authority's signature on the certificate, the
member's signature over the rebuilt bytes, validity and revocation.  Nothing is weakened: the
signature covers the certificate the receiver holds, and a rebuilt record is byte for byte the record
a full copy would have carried (the sender sends a reference only when ``rebuild`` gives it back
exactly, see ``compact``).

A receiver that holds no record of the member, or one with another certificate (the member
re-enrolled), cannot rebuild it: it refuses the item (counted, not the sender's fault) and gets the
full record from anti-entropy or a later full copy.  A reference whose rebuilt bytes do not verify is
forged: the relaying peer is blamed, as for a forged full record.

Which records go as references (``MemberRecords.learn_record``, ``OwnRecord``): relayed updates of a
member whose previous record had the same certificate, and our own refutations and leave; never a
first record of a member (a join, our start record), and only to members whose own record lists
``READS_RECORD_REFS`` (``Piggyback.send``: a release before them cannot decode the item).
"""

from __future__ import annotations

from protocol.gossip.members import Rec
from protocol.gossip.wire import (
    MAX_ADDRESS_CHARS,
    MAX_INCARNATION,
    MAX_NODE_ID_CHARS,
    SIG_BYTES,
    Alive,
    AliveRef,
    MemberRecord,
    encode,
    encode_record,
)
from protocol.trust.signing import Envelope, Signature, decode_envelope, encode_envelope, key_id


def rebuild(item: AliveRef, cert_bytes: bytes, identity_key: bytes) -> bytes:
    """The signed envelope ``item`` stands for, around ``cert_bytes`` (the certificate the receiver
    holds, whose identity key is ``identity_key``): to be verified like any record."""
    rec = MemberRecord(item.node_id, item.incarnation, item.address, cert_bytes, item.left, item.features)
    env = Envelope("member", encode_record(rec), (Signature(key_id(identity_key), item.sig),))
    return encode_envelope(env)


# the broadcast queue's key, the item, its encoded size, its compact form, that size
RelayForms = tuple[tuple[str, str], Alive, int, AliveRef | None, int]


def relay_forms(rec: Rec) -> RelayForms:
    """``rec`` as a piggyback item (``Alive``, with its queue key) and as an ``AliveRef`` (None where
    ``compact`` gives none), with their encoded sizes: made once per record and kept on it.  A ``Rec``
    is immutable and shared by every node that holds it, so the simulator's nodes relaying one leave
    share one copy instead of one each (made per node, they added ~1 GB to the peak RSS of the
    100,000-node run)."""
    forms = rec.relay
    if forms is None:
        item = Alive(rec.record)
        ref = compact(rec)
        forms = rec.relay = (("m", rec.node_id), item, len(encode(item)), ref, len(encode(ref)) if ref is not None else 0)
    return forms


def compact(rec: Rec) -> AliveRef | None:
    """``rec`` (a verified record) as an ``AliveRef``, or None when ``rebuild`` would not give back its
    exact bytes (another encoding, more than one signature, an address too long for the item)."""
    if len(rec.address) > MAX_ADDRESS_CHARS or len(rec.node_id) > MAX_NODE_ID_CHARS or \
            not 0 <= rec.incarnation <= MAX_INCARNATION:
        return None
    sigs = decode_envelope(rec.record, "member").signatures
    if len(sigs) != 1 or len(sigs[0].sig) != SIG_BYTES:
        return None
    item = AliveRef(rec.node_id, rec.incarnation, rec.address, rec.left, rec.features, rec.cert_ref, sigs[0].sig)
    if rebuild(item, rec.cert_bytes, rec.cert.identity_key) != rec.record:
        return None
    return item
