"""policymesh's sans-IO core: no I/O, clock or randomness of its own; the daemon and the simulator drive it.

    protocol/
      errors.py    typed errors, split by blame (h11 style)
      entropy.py   the injected randomness
      trust/       what the authority signs and how a node decides to believe it
      channel/     Noise XX sessions between members (and operators)
      gossip/      the node: membership, dissemination, acceptance, status

Modules moved when the core was grouped into sub-packages (``protocol.noise`` is now
``protocol.channel.noise``, ``protocol.node`` is ``protocol.gossip.node`` ...).  Their old paths stay
importable through ``_moved`` so scripts written against them keep working; new code uses the new paths.
"""

from protocol import _moved

_moved.install()
