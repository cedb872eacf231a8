"""What the simulator reads off a frame without decoding it: its kind (the wire tag) and its size on
the wire.  Gossip tags come from ``protocol.gossip.wire``, the baselines' from ``simulations.baselines``.
"""

from __future__ import annotations

import re
import typing

from protocol.gossip.wire import Announce, Message, PolicyPull, PolicyPush, RootPull, RootPush

from .baselines import TAG_BODY, TAG_NAMES

GOSSIP_KIND_NAMES = {cls.__struct_config__.tag: re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
                     for cls in typing.get_args(Message)}
KIND_NAMES: dict[int, str] = dict(sorted({**GOSSIP_KIND_NAMES, **TAG_NAMES}.items()))  # tag -> name, by tag
NKINDS = max(KIND_NAMES) + 1  # kinds are counted in lists indexed by tag; 0 = not a known frame
DISSEMINATION_KINDS = frozenset([*(cls.__struct_config__.tag for cls in (Announce, PolicyPull, PolicyPush,
                                                                            RootPull, RootPush)), TAG_BODY])


def frame_kind(data: bytes) -> int:
    """The tag of a MessagePack array frame (``[tag, ...]``, fewer than 16 fields), else 0."""
    if len(data) > 1 and 0x90 <= data[0] <= 0x9F:
        k = data[1]
        return k if k < NKINDS else 0
    return 0
