"""Chaos drills: one scenario file, run in the simulator or on real daemons (``meshsim run --real``), with
the same fault schedule (``schedule``), the same invariants (``checks``) and one report schema.

``schedule`` draws every fault's nodes and moments from the seed; ``checks`` are the invariants both
modes feed; ``simfaults`` adds the drill's node faults to the simulator; ``real`` (with ``nodes``,
``netfaults``, ``policydoc`` and ``realreport``) runs the scenario on ``meshnode`` processes in network
namespaces with real nftables (root only).
"""
