"""Node configuration (TOML), validated with clear errors. Unknown keys are errors.

* ``schema``      the sections of a node.toml, their fields and defaults.
* ``validation``  the rules between values (addresses, ranges, URLs, overrides needed); ``ConfigError``.
* ``loading``     ``load_config``: read, convert, validate; ``LoadedConfig`` (paths, the PagerDuty key,
                  the active overrides).
* ``template``    ``render_config``: the node.toml ``meshctl node enroll`` writes.

Every switch that weakens security lives in ``[overrides]``; ``LoadedConfig.active_overrides()`` lists
those that are on, and the daemon logs them at start, shows them in status and exports them as a metric.
Callers import from here (``from meshnode.config import load_config, ConfigError``).
"""

from .loading import LoadedConfig, load_config, read_routing_key
from .schema import (
    BACKENDS,
    DEFAULT_ADMIN_PORT,
    DEFAULT_MESH_PORT,
    DEFAULT_PEER_PROBE_PORTS,
    AdminSection,
    AlertsSection,
    EnforceSection,
    IdentitySection,
    MeshSection,
    NodeConfig,
    NodeSection,
    OverridesSection,
    SourcesSection,
    TrustSection,
    ValidateSection,
)
from .template import render_config
from .validation import ConfigError, split_hostport, validate

__all__ = [
    "BACKENDS",
    "DEFAULT_ADMIN_PORT",
    "DEFAULT_MESH_PORT",
    "DEFAULT_PEER_PROBE_PORTS",
    "AdminSection",
    "AlertsSection",
    "ConfigError",
    "EnforceSection",
    "IdentitySection",
    "LoadedConfig",
    "MeshSection",
    "NodeConfig",
    "NodeSection",
    "OverridesSection",
    "SourcesSection",
    "TrustSection",
    "ValidateSection",
    "load_config",
    "read_routing_key",
    "render_config",
    "split_hostport",
    "validate",
]
