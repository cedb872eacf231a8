"""What the simulator's parts see of the simulation they belong to (typing only).

``simulations.engine.Simulation`` builds the parts (faults, measurement, the chaos drill's model,
the report, the world of effects) and hands itself to them.  They name it through these protocols,
each listing what that part reads or calls, so the imports go one way: the engine imports its
parts, no part imports the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .drill.simfaults import SimDrill
    from .faults import Faults
    from .hosts import Host, Version
    from .invariants import Invariants
    from .kernel import Kernel
    from .measure import Measurement
    from .network import Network
    from .scenario import Scenario


class SimState(Protocol):
    """What every part reads: the scenario, the hosts and their ids, the versions, the kernel, the
    network model, the invariants, and how many honest hosts are up."""

    sc: Scenario
    seed: int
    n: int
    regions: list[str]
    hosts: list[Host]
    versions: list[Version]
    ids: list[str]
    by_id: dict[str, int]
    kernel: Kernel
    net: Network
    inv: Invariants
    live_honest: int


class FaultsSim(SimState, Protocol):
    """The scenario's faults also boot nodes again and re-publish after an authority outage."""

    def boot(self, i: int) -> None: ...

    def publish(self, _i: int, v: Version) -> None: ...


class MeasureSim(SimState, Protocol):
    """The measurement also reads the faults' disturbances and drives the drill's sampling."""

    @property
    def faults(self) -> Faults: ...

    @property
    def drill(self) -> SimDrill: ...


class DrillSim(SimState, Protocol):
    """The chaos drill's model crashes and restarts nodes through the scenario's faults."""

    @property
    def faults(self) -> Faults: ...


class ReportSim(MeasureSim, Protocol):
    """The report reads every part's results."""

    wall_s: float
    policy_bytes: int
    hostile_idx: frozenset[int]

    @property
    def measure(self) -> Measurement: ...

    @property
    def bodies_to_hostile(self) -> int: ...

    @property
    def datagram_counts(self) -> dict[str, int]: ...

    def live_hosts(self) -> list[Any]: ...

    def end_checks(self, live: list[Any]) -> tuple[list[str], dict[str, Any] | None]: ...
