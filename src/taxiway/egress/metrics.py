"""Counters, gauges and histograms rendered in Prometheus' text format (0.0.4)."""

from __future__ import annotations

import bisect
from collections import defaultdict

Labels = tuple[tuple[str, str], ...]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """A small registry; the server bumps it, ``render()`` answers GET /metrics."""

    def __init__(self) -> None:
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._hist: dict[str, dict[Labels, list[float]]] = defaultdict(dict)

    def describe(self, name: str, kind: str, help_: str) -> None:
        self._help[name] = (kind, help_)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._values[name]
        series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        self._values[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        h = self._hist[name].get(key)
        if h is None:
            h = self._hist[name][key] = [0.0] * (len(_BUCKETS) + 2)  # buckets.., +Inf count, sum
        h[bisect.bisect_left(_BUCKETS, seconds)] += 1
        h[-1] += seconds

    def value(self, name: str, **labels: str) -> float:
        return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        out: list[str] = []
        for name in sorted(set(self._values) | set(self._hist) | set(self._help)):
            kind, help_ = self._help.get(name, ("untyped", ""))
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            for key, v in sorted(self._values.get(name, {}).items()):
                out.append(f"{name}{_labels(key)} {v:g}")
            for key, h in sorted(self._hist.get(name, {}).items()):
                acc = 0.0
                for bound, count in zip(_BUCKETS, h, strict=False):
                    acc += count
                    le = f'le="{bound}"'
                    out.append(f"{name}_bucket{_labels(key, le)} {acc:g}")
                acc += h[len(_BUCKETS)]
                inf = 'le="+Inf"'
                out.append(f"{name}_bucket{_labels(key, inf)} {acc:g}")
                out.append(f"{name}_sum{_labels(key)} {h[-1]:.6f}")
                out.append(f"{name}_count{_labels(key)} {acc:g}")
        return "\n".join(out) + "\n"
