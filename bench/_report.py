"""Results: per-operation rows, target checks, the printed table and the JSON document."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from ._workload import Sample

__all__ = ["OpResult", "citus_targets", "format_table", "format_targets", "targets"]

#: Required throughput of sessions_sql relative to the raw driver, per mode.
RATIO_TARGETS = {"serial": 0.9, "concurrent": 0.75}
GC_MIN_SESSIONS_PER_S = 50_000
GC_MAX_WRITE_P99_MS = 50.0
LISTING_MAX_PEAK_MB = 100.0


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


@dataclass
class OpResult:
    """One operation on one database in one mode: paired rounds of raw and sessions_sql."""

    db: str
    mode: str
    op: str
    concurrency: int
    ops_per_round: int
    raw: list[Sample] = field(default_factory=list)
    sql: list[Sample] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Median over the pairs of (sessions_sql ops/s) / (raw ops/s)."""
        return _median([s.ops_per_s / r.ops_per_s for r, s in zip(self.raw, self.sql, strict=True)])

    def summary(self, samples: list[Sample]) -> dict[str, float]:
        return {
            "ops_per_s": _median([s.ops_per_s for s in samples]),
            "p50_ms": _median([s.p50_ms for s in samples]),
            "p99_ms": _median([s.p99_ms for s in samples]),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "db": self.db,
            "mode": self.mode,
            "op": self.op,
            "concurrency": self.concurrency,
            "ops_per_round": self.ops_per_round,
            "raw": self.summary(self.raw),
            "sessions_sql": self.summary(self.sql),
            "ratio": self.ratio,
            "target_ratio": RATIO_TARGETS.get(self.mode),
            "rounds": {
                "raw": [_sample(s) for s in self.raw],
                "sessions_sql": [_sample(s) for s in self.sql],
            },
        }


def _sample(s: Sample) -> dict[str, float]:
    return {
        "ops": s.ops,
        "seconds": round(s.seconds, 6),
        "ops_per_s": round(s.ops_per_s, 1),
        "p50_ms": round(s.p50_ms, 4),
        "p99_ms": round(s.p99_ms, 4),
    }


def format_table(results: list[OpResult], peer: str = "raw", subject: str = "sql") -> str:
    header = (
        "db", "mode", "op", f"{peer} ops/s", f"{subject} ops/s", "ratio",
        f"{peer} p50", f"{peer} p99", f"{subject} p50", f"{subject} p99",
    )  # fmt: skip
    lines = [header]
    for r in results:
        raw, sql = r.summary(r.raw), r.summary(r.sql)
        target = RATIO_TARGETS.get(r.mode, 0.0)
        mark = "" if r.ratio >= target else " *"
        lines.append(
            (
                r.db,
                r.mode,
                r.op,
                f"{raw['ops_per_s']:,.0f}",
                f"{sql['ops_per_s']:,.0f}",
                f"{r.ratio:.2f}{mark}",
                f"{raw['p50_ms']:.3f}",
                f"{raw['p99_ms']:.3f}",
                f"{sql['p50_ms']:.3f}",
                f"{sql['p99_ms']:.3f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    left = 3  # db, mode, op are left-aligned; numbers right-aligned
    out = []
    for n, line in enumerate(lines):
        cells = [
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("latencies in ms (median over rounds of each round's p50/p99); ratio = median")
    out.append(f"of per-pair {subject}/{peer} throughput; * = below the target for the mode")
    return "\n".join(out)


def targets(
    results: list[OpResult],
    gc: dict[str, Any] | None,
    listings: list[dict[str, Any]],
    gc_expired: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check the four targets; a part that did not run is reported as not measured."""
    misses = [
        {"db": r.db, "mode": r.mode, "op": r.op, "ratio": round(r.ratio, 3)}
        for r in results
        if r.ratio < RATIO_TARGETS.get(r.mode, 0.0)
    ]
    ratio_target: dict[str, Any] = {
        "description": "every method >= 0.9x raw serially and >= 0.75x with concurrent tasks",
        "measured": bool(results),
        "met": bool(results) and not misses,
        "misses": misses,
    }
    gc_target: dict[str, Any] = {
        "description": f"GC >= {GC_MIN_SESSIONS_PER_S:,} sessions/s with concurrent "
        f"write_value p99 < {GC_MAX_WRITE_P99_MS:g} ms (PostgreSQL)",
        "measured": gc is not None,
        "met": gc is not None
        and gc["sessions_per_s"] >= GC_MIN_SESSIONS_PER_S
        and gc["write_p99_ms_during"] < GC_MAX_WRITE_P99_MS,
    }
    if gc is not None:
        gc_target["sessions_per_s"] = round(gc["sessions_per_s"])
        gc_target["write_p99_ms_during"] = round(gc["write_p99_ms_during"], 2)
    listing_target: dict[str, Any] = {
        "description": f"listing all sessions with peak RSS < {LISTING_MAX_PEAK_MB:g} MB",
        "measured": bool(listings),
        "met": bool(listings)
        and all(x["rss_peak_kb"] / 1024 < LISTING_MAX_PEAK_MB for x in listings),
        "peaks_mb": {x["db"]: round(x["rss_peak_kb"] / 1024, 1) for x in listings},
    }
    both = gc is not None and gc_expired is not None
    expired_target: dict[str, Any] = {
        "description": "GC by expiry at least as fast per session as GC by creation time, "
        f"with concurrent write_value p99 < {GC_MAX_WRITE_P99_MS:g} ms (PostgreSQL)",
        "measured": both,
        "met": both
        and gc_expired["sessions_per_s"] >= gc["sessions_per_s"]  # type: ignore[index]
        and gc_expired["write_p99_ms_during"] < GC_MAX_WRITE_P99_MS,  # type: ignore[index]
    }
    if gc_expired is not None:
        expired_target["sessions_per_s"] = round(gc_expired["sessions_per_s"])
        expired_target["write_p99_ms_during"] = round(gc_expired["write_p99_ms_during"], 2)
    return {
        "ratios": ratio_target,
        "gc": gc_target,
        "gc_expired": expired_target,
        "listing": listing_target,
    }


def format_targets(report: dict[str, Any]) -> str:
    lines = []
    for name, target in report.items():
        state = ("MET" if target["met"] else "MISSED") if target["measured"] else "not measured"
        measured = f" (measured {target['ratio']:.2f}x)" if target.get("ratio") is not None else ""
        lines.append(f"target {name}: {state}: {target['description']}{measured}")
        for miss in target.get("misses", []):
            lines.append(f"    {miss['db']} {miss['mode']} {miss['op']}: {miss['ratio']:.2f}x")
    return "\n".join(lines)


#: The operations of the Citus comparison that only read, and the share of their ratio (to
#: plain PostgreSQL) that every writing operation must reach.
CITUS_READS = (
    "read_value_hit",
    "read_value_miss",
    "get_session_age",
    "read_values",
    "read_session",
)
CITUS_WRITE_SHARE = 0.8


def citus_targets(
    results: list[OpResult], gcs: dict[str, dict[str, Any]], gcs_pg: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The Citus targets: per mode, every write's ratio to plain PostgreSQL at least
    CITUS_WRITE_SHARE of the reads' (median) ratio; GC at least as fast per session."""
    misses, reads = [], {}
    for mode in sorted({r.mode for r in results}):
        rows = [r for r in results if r.mode == mode]
        read = _median([r.ratio for r in rows if r.op in CITUS_READS])
        reads[mode] = round(read, 3)
        for r in rows:
            if r.op not in CITUS_READS and r.ratio < CITUS_WRITE_SHARE * read:
                misses.append({"db": r.db, "mode": mode, "op": r.op, "ratio": round(r.ratio, 3)})
    writes: dict[str, Any] = {
        "description": f"every write's ratio to plain PostgreSQL >= {CITUS_WRITE_SHARE}x the "
        "reads' median ratio, per mode (Citus)",
        "measured": bool(results),
        "met": bool(results) and not misses,
        "read_ratios": reads,
        "misses": misses,
    }
    kinds = sorted(set(gcs) & set(gcs_pg))
    gc: dict[str, Any] = {
        "description": "GC on Citus at least as fast per session as on plain PostgreSQL",
        "measured": bool(kinds),
        "met": bool(kinds)
        and all(gcs[k]["sessions_per_s"] >= gcs_pg[k]["sessions_per_s"] for k in kinds),
        "sessions_per_s": {
            k: {
                "citus": round(gcs[k]["sessions_per_s"]),
                "postgresql": round(gcs_pg[k]["sessions_per_s"]),
            }
            for k in kinds
        },
    }
    return {"citus_writes": writes, "citus_gc": gc}
