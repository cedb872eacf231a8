"""Region-aware choice of peers among the alive members: most traffic stays in-region, every round
keeps at least one cross-region contact, and an open channel is preferred (it saves a dial)."""

from __future__ import annotations

from collections.abc import Callable

from protocol.entropy import Entropy
from protocol.gossip.member_table import ALIVE_CODE, MemberTable
from protocol.gossip.members import IndexedSet


def pick(table: MemberTable, rng: Entropy, k: int, exclude: Callable[[str], bool],
         prefer: Callable[[str], bool] | None = None, cross: int = 1, preferred: IndexedSet | None = None
         ) -> list[str]:
    """Up to ``k`` alive peers: ``k - cross`` from our region, ``cross`` from others (falling back
    to whatever exists).  ``prefer`` (e.g. "has an open channel") wins ties among a few draws;
    ``preferred`` (the peers with an open channel) are drawn from first when ``prefer`` is given."""
    out: list[str] = []
    ids = table.ids
    region = table.region
    local = table.alive.get(region)
    others = len(table.alive_all) - (len(local) if local else 0)
    n_cross = min(cross, k) if others > 0 else 0
    n_local = k - n_cross

    def draw(pool_choice: Callable[[], str | None], want: int) -> None:
        got = 0
        for _ in range(want * 6):
            if got >= want:
                return
            best: str | None = None
            for _try in range(3):
                cand = pool_choice()
                if cand is None or cand in out or exclude(cand):
                    continue
                best = cand
                if prefer is None or prefer(cand):
                    break
            if best is not None:
                out.append(best)
                got += 1

    pref = preferred if prefer is not None else None
    if pref is not None and len(pref):
        # An open channel saves a dial (3 round trips, more under loss): draw from those first.
        of, recs, codes = table.index.of, table.recs, table.liveness_codes

        def pref_choice(local_wanted: bool) -> str | None:
            nid = pref.choice(rng)
            i = of.get(nid)  # (table.rec and table.is_alive, one lookup)
            if i is None or i >= len(recs) or i >= len(codes):
                return None
            r = recs[i]
            if r is None or codes[i] != ALIVE_CODE or (r.region == region) != local_wanted:
                return None
            return nid

        draw(lambda: pref_choice(True), n_local)
        if n_cross:
            draw(lambda: pref_choice(False), n_cross)
    have_local = sum(1 for x in out if (r := table.rec(x)) is not None and r.region == region)
    if local is not None and len(local) > 0 and have_local < n_local:
        draw(lambda: ids[local.choice(rng)], n_local - have_local)
    alive_all = table.alive_all
    if n_cross:
        def cross_choice() -> str | None:
            i = alive_all.choice(rng)
            r = table.recs[i]
            return ids[i] if r is not None and r.region != region else None
        draw(cross_choice, k - len(out))
    if len(out) < k and len(alive_all) > 0:
        draw(lambda: ids[alive_all.choice(rng)], k - len(out))
    return out


def pick_cross_region(table: MemberTable, rng: Entropy) -> list[str]:
    """One alive member of a random other region that has any (none if there is no such region)."""
    others = [r for r, s in table.alive.items() if r != table.region and len(s)]
    if not others:
        return []
    region = rng.choice(sorted(others))
    return [table.id_at(table.alive[region].choice(rng))]
