"""Files shipped as examples: the sample policy (``policy.toml``)."""

from __future__ import annotations

from importlib.resources import files


def sample_policy_toml() -> str:
    """The text of the sample policy: web -> app on tcp/8080, app -> db on tcp/5432, drop the rest.

    More ``[[allow]]`` rules may be appended to it as they are (it ends with comments only)."""
    return files(__name__).joinpath("policy.toml").read_text(encoding="utf-8")
