"""Noise handshake patterns (revision 34, section 7) as token tables: NN, XX (the mesh's) and IK.

`protocol.channel.noise` interprets them; a pattern names its pre-messages and the tokens of each
message, initiator first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from protocol.errors import LocalProtocolError

E, S, EE, ES, SE, SS = "e", "s", "ee", "es", "se", "ss"
TOKENS: Final = frozenset({E, S, EE, ES, SE, SS})


@dataclass(frozen=True, slots=True)
class HandshakePattern:
    """A handshake pattern (spec section 7): pre-messages and message token lists, initiator first."""

    name: str
    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        for tokens in (self.initiator_pre, self.responder_pre, *self.messages):
            unknown = set(tokens) - TOKENS
            if unknown:
                raise LocalProtocolError(f"pattern {self.name}: unknown tokens {sorted(unknown)}")


NN: Final = HandshakePattern("NN", (), (), ((E,), (E, EE)))
XX: Final = HandshakePattern("XX", (), (), ((E,), (E, EE, S, ES), (S, SE)))
IK: Final = HandshakePattern("IK", (), (S,), ((E, ES, S, SS), (E, EE, SE)))


def needs_local_static(pattern: HandshakePattern, initiator: bool) -> bool:
    own_pre = pattern.initiator_pre if initiator else pattern.responder_pre
    if S in own_pre:
        return True
    for index, tokens in enumerate(pattern.messages):
        mine = (index % 2 == 0) == initiator
        if mine and S in tokens:
            return True
        # DH tokens name the initiator's key first: "se" uses the initiator's s, "es" the responder's
        if SS in tokens or (SE in tokens and initiator) or (ES in tokens and not initiator):
            return True
    return False
