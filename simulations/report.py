"""Report output: the JSON document (byte-identical for the same seed apart from ``wall_s``) and the PNG
plot of converged fraction over time per region, with fault windows shaded."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(to_json(report))


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed (it comes with the ``[sim]`` extra)."""


def require_plotting() -> None:
    """Fail before a long run, not after it, when ``--plot`` cannot be honoured."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailableError(
            "--plot needs matplotlib: install the simulator extra (pip install -e '.[sim]')")


def plot(sim: Any, report: dict[str, Any], path: str) -> None:
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    ts = [t / 1000 for t in sim.series_t]
    series = {region: [None if isinstance(v, float) and math.isnan(v) else v for v in values]
              for region, values in sim.series.items()}
    for region, values in series.items():
        ax.plot(ts, values, label=region, linewidth=1.4)
    for start, end, label in sim.fault_windows:
        ax.axvspan(start / 1000, end / 1000, color="tab:red", alpha=0.12)
        ax.text(start / 1000, 1.02, label, fontsize=7, color="tab:red", va="bottom")
    for v in report["versions"]:
        if v["published_at_ms"] is not None:
            ax.axvline(v["published_at_ms"] / 1000, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(-0.02, 1.1)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("live nodes on the newest published version")
    t100 = report["t100_ms"]
    ax.set_title(f"{report['scenario']} · {report['protocol']} · {report['nodes']} nodes · loss {report['loss']:.0%}"
                 f" · t100 {f'{t100} ms' if t100 is not None else 'n/a'} · seed {report['seed']}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    # Zoom on the last published version: milliseconds from its publication.
    published = [v for v in report["versions"] if v["published_at_ms"] is not None]
    if published and sim.series_t:
        v = published[-1]
        t0 = v["published_at_ms"]
        span = max(1000, int(1.3 * (v.get("t100_ms") or 3000)))
        idx = [i for i, t in enumerate(sim.series_t) if t0 - 200 <= t <= t0 + span]
        for region, values in series.items():
            zoom.plot([sim.series_t[i] - t0 for i in idx], [values[i] for i in idx], label=region,
                      linewidth=1.4, drawstyle="steps-post")
        for start, end, _label in sim.fault_windows:
            if start < t0 + span and end > t0 - 200:
                zoom.axvspan(max(start, t0 - 200) - t0, min(end, t0 + span) - t0, color="tab:red", alpha=0.12)
        zoom.axvline(0, color="grey", linestyle=":", linewidth=1)
        zoom.set_ylim(-0.02, 1.1)
        zoom.set_xlabel(f"ms after serial {v['serial']} was published")
        zoom.set_title(f"zoom: t50 {v.get('t50_ms')} ms · t99 {v.get('t99_ms')} ms · t100 {v.get('t100_ms')} ms",
                       fontsize=9)
        zoom.grid(alpha=0.3)
    else:
        zoom.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
