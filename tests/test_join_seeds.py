"""Joining through seeds: a joiner retries every other seed while nobody answers; once somebody has
answered, it dials one seed it does not know yet per retry (a joiner whose directory is still arriving
does not know the seeds' addresses yet: a Sync to each would bring the whole directory once per seed)."""

from __future__ import annotations

from protocol.gossip import Send, TimerFired
from protocol.gossip.wire import Members, decode
from simulations.fakelink import FakeLink

SEEDS = ["10.0.0.1:7946", "10.0.0.2:7946", "10.0.0.3:7946"]


def _seeds_up_then_joiner(drop_to_joiner: tuple[type, ...] | None) -> tuple[FakeLink, list[tuple[int, str]]]:
    """Three seeds (n0-n2) that know each other, then n3 starts at 3 s; frames to n3 of the types
    ``drop_to_joiner`` are dropped (None: all frames).  Also returns the (time, address) of every message
    n3 sends by address (a dial of a seed it does not know as a member), as they happen."""
    link = FakeLink(n=4, seeds=3)
    for nid in ("n0", "n1", "n2"):
        link.feed(nid, TimerFired())
    link.run_for(3000)
    link.drop = lambda src, dst, data: dst == "n3" and (drop_to_joiner is None or
                                                       isinstance(decode(data), drop_to_joiner))
    dials: list[tuple[int, str]] = []
    send = link.send

    def recording_send(i: int, eff: Send) -> None:
        if link.hosts["n3"].idx == i and not eff.peer:
            assert type(decode(eff.data)).__name__ == "Sync"
            dials.append((link.now_ms, eff.address))
        send(i, eff)

    link.send = recording_send  # type: ignore[method-assign]
    link.feed("n3", TimerFired())
    return link, dials


def test_a_joiner_nobody_answers_retries_every_seed() -> None:
    link, dials = _seeds_up_then_joiner(drop_to_joiner=None)  # nothing reaches it
    link.run_for(2500)
    assert len(dials) == 4  # the first seed, then all three when nobody answered
    assert sorted(a for _t, a in dials[1:]) == SEEDS


def test_an_answered_joiner_dials_one_seed_it_does_not_know_yet_per_retry() -> None:
    # The seed it dialled answers (its record says it is alive), but the directory it then sends
    # (Members) is still on its way, so the other seeds are not known yet.
    link, dials = _seeds_up_then_joiner(drop_to_joiner=(Members,))
    link.run_for(2500)
    n3 = link.hosts["n3"].node
    assert len(dials) == 2  # the first seed, then one of the two unknown ones (before: both)
    assert len(n3.members.alive_all) == 2
    # ... the last one on the regular interval
    link.run_for(int(link.cfg.seed_retry_interval_ms * 1.2))
    assert len(dials) == 3
    assert sorted(a for _t, a in dials) == SEEDS
    assert dials[2][0] >= 3000 + link.cfg.seed_retry_interval_ms
    assert len(n3.members.alive_all) == 3
