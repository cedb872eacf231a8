"""The simulator's policy document (``simulations.hosts.make_document``) as the TOML an operator signs
with ``meshctl policy sign``: the real drill enforces the same rules the simulator disseminates."""

from __future__ import annotations

from ..hosts import make_document


def document_toml(rules: int) -> str:
    doc = make_document(rules)
    out = [f'[defaults]\ninbound = "{doc.defaults.inbound}"\nmode = "{doc.defaults.mode}"\n']
    for r in doc.allow:
        out.append(f'\n[[allow]]\nname = "{r.name}"\nfrom = {_list(r.sources)}\nto = {_list(r.to)}\n'
                   f'ports = {_list(r.ports)}\n')
    return "".join(out)


def _list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{x}"' for x in items) + "]"
