"""The text of `negcase status`, for people (the data comes from negcase.cli.status)."""

from __future__ import annotations

import textwrap
import time
from typing import Any

from negcase.store.cases import RATE_WINDOW_S


def render_status(status: dict[str, Any]) -> str:
    """The status as text for people: one section per question, columns aligned."""
    sections = [
        _render_header(status),
        _render_streams(status),
        _render_rates(status["rates_per_s"]),
        _render_cases(status["cases"]),
        *([_render_partitions(status["partitions"])] if "partitions" in status else []),
        _render_leases(status["leases"], status["cases"]["leased"]),
        _render_checkpoints(status),
        _render_live(status["live"]),
        _render_workers(status),
        _render_models(status["models"]),
        _render_counters(status["counters"]),
        _render_memory(status["memory"]),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections)


def _render_header(status: dict[str, Any]) -> list[str]:
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["redis_time_ms"] / 1000))
    return [f"negcase status | namespace {status['namespace']} | {at} (Redis time)"]


def _render_streams(status: dict[str, Any]) -> list[str]:
    rows = [["streams", "group", "entries", "pending", "oldest idle", "lag", "consumers", "dead"]]
    reasons = []
    for section in ("trades", "signals"):
        s = status[section]
        idle_ms = s["oldest_pending_idle_ms"]
        rows.append(
            [
                f"  {section}",
                s["group"],
                s["stream_length"],
                s["pending"],
                "-" if idle_ms is None else f"{idle_ms / 1000:.1f}s",
                "-" if s["lag"] is None else f"{s['lag']}{'+' if s['lag_capped'] else ''}",
                s["consumers"],
                s["dead_letters"],
            ]
        )
        reasons += [f"  latest dead {section}: {_clip(r)}" for r in s["latest_dead_reasons"]]
        reasons += _render_idle(section, s["consumer_list"])
    return _table(rows, "<<") + reasons


def _render_partitions(partitions: list[dict[str, Any]]) -> list[str]:
    rows = [
        ["partitions", "trades", "pending", "lag", "queued", "leased", "done", "dead", "cases/s"]
    ]
    for part in partitions:
        trades, cases = part["trades"], part["cases"]
        rows.append(
            [
                f"  {part['partition']} {part['namespace']}",
                trades["stream_length"],
                trades["pending"],
                "-" if trades["lag"] is None else trades["lag"],
                cases["queued"],
                cases["leased"],
                cases["done"],
                cases["dead"],
                part["rates_per_s"]["cases_added"],
            ]
        )
    return _table(rows, "<>")


def _render_idle(section: str, consumers: list[dict[str, Any]]) -> list[str]:
    idle = [c for c in consumers if c["idle"]]
    if not idle:
        return []
    names = ", ".join(
        f"{c['name']} ({c['idle_ms'] / 1000:.0f}s"
        + (f", {c['pending']} pending)" if c["pending"] else ")")
        for c in idle[:5]
    )
    more = f" and {len(idle) - 5} more" if len(idle) > 5 else ""
    return [
        f"  idle {section} consumers: {names}{more}; `negcase prune --idle-s N` removes those "
        "without pending entries"
    ]


def _render_rates(rates: dict[str, float]) -> list[str]:
    return [
        f"rates (last {RATE_WINDOW_S} s)  {rates['trades']:.2f} trades/s | "
        f"{rates['losses']:.2f} losses/s | {rates['cases_added']:.2f} cases/s | "
        f"{rates['dead_lettered']:.2f} dead letters/s"
    ]


def _render_cases(cases: dict[str, Any]) -> list[str]:
    check = "conserved" if cases["conserved"] else "NOT CONSERVED: counts changed mid-read?"
    by_priority = " | ".join(f"P{p} {n}" for p, n in cases["queued_by_priority"].items())
    return [
        f"cases  {cases['total']} trainable = {cases['queued']} queued + {cases['leased']} "
        f"leased + {cases['done']} done + {cases['dead']} dead  ({check})",
        f"  queued by priority  {by_priority}",
        f"  rejected by gate    {cases['rejected']} (part of done)",
        f"  held out            {cases.get('held_out', 0)} (part of done: never trained, they "
        "judge models)",
        *_render_reasons(cases["rejected_reasons"]),
        f"  dead                {cases['dead']}",
        *_render_reasons(cases["dead_reasons"]),
        f"  without features    {cases['without_features']} (archived, never queued)",
    ]


def _render_reasons(reasons: dict[str, str]) -> list[str]:
    return [f"    {case_id}: {_clip(reason)}" for case_id, reason in reasons.items()]


def _clip(text: str, width: int = 80) -> str:
    """One screen line of a long reason; --json has it whole."""
    return text if len(text) <= width else f"{text[: width - 3]}..."


def _render_leases(leases: list[dict[str, Any]], held: int) -> list[str]:
    if not leases:
        return ["leases  none held"]
    rows = [["  case", "worker", "priority", "attempts", "deadline", ""]]
    for lease in leases:
        rows.append(
            [
                f"  {lease['case_id']}",
                lease["worker"],
                f"P{lease['priority']}",
                lease["attempts"],
                f"{lease['deadline_in_s']:+.1f}s",
                "expired, waiting for the reaper" if lease["expired"] else "",
            ]
        )
    return [f"leases  {held} held, soonest deadline first", *_table(rows, "<<>>><")]


def _render_checkpoints(status: dict[str, Any]) -> list[str]:
    latest = status["latest_checkpoint"]
    title = f"checkpoints  latest {'none' if latest is None else f'v{latest}'}"
    if not status["checkpoints"]:
        return [title]
    served_by = {label: ", ".join(names) for label, names in status["serving"].items()}
    rows = [
        ["  version", "parent", "trainer", "cases", "held-out loss", "held-out acc", "served by"]
    ]
    for row in status["checkpoints"]:
        metrics, parent = row["metrics"], row["parent_version"]
        before, after = metrics.get("heldout_before") or {}, metrics.get("heldout_after") or {}
        version = row["version"]
        rows.append(
            [
                f"  v{version}",
                "-" if parent is None else f"v{parent}",
                row["trainer"] or "-",
                row["cases"],
                before_after(before, after, "loss", "{:.3f}"),
                before_after(before, after, "accuracy", "{:.1%}"),
                served_by.get(str(version), "-"),
            ]
        )
    return [title, *_table(rows, "<<<><<<")]


def _render_live(live: dict[str, Any]) -> list[str]:
    service, trial = live["service"], live["canary"]
    if service is None:
        return ["serving  nothing yet: no checkpoint published"]
    line = f"serving  v{service} in service"
    if live["service_since_ms"]:
        line += f" since {_clock(live['service_since_ms'])}"
    if live["service_defers"]:
        line += " (defers to the engine's own rule: answers with no opinion)"
    if live["history"]:
        line += " | before it: " + ", ".join(f"v{v}" for v in live["history"][:5])
    lines = [line]
    if trial is not None:
        needed = trial["min_outcomes"] or "?"
        z = "" if trial["z"] is None else f", z {trial['z']:+.2f} against v{service} so far"
        lines.append(
            f"  canary v{trial['version']} on {trial['share']:.0%} of requests: "
            f"{trial['outcomes']} of {needed} outcomes{z}"
        )
    rows = [["  live figures", "role", "outcomes", "trades", "losses", "loss rate", "P&L/decision"]]
    for version, row in live["versions"].items():
        traded = row["trades"] > 0
        rows.append(
            [
                f"  v{version}",
                row["role"],
                row["outcomes"],
                row["trades"],
                row["losses"],
                f"{row['loss_rate']:.1%}" if traded else "-",
                f"{row['mean_pnl_pct']:+.3f}%" if row["outcomes"] else "-",
            ]
        )
    table = _table(rows, "<<") if live["versions"] else []
    return [*lines, *table]


def _clock(at_ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at_ms / 1000))


def before_after(
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    name: str,
    form: str,
    missing: str = "-",
    arrow: str = " -> ",
) -> str:
    """`before -> after` of one measurement (`form` formats each), or `missing`."""
    if not before or not after or name not in before or name not in after:
        return missing
    return f"{form.format(before[name])}{arrow}{form.format(after[name])}"


def _render_workers(status: dict[str, Any]) -> list[str]:
    alive = " | ".join(f"{kind} {n}" for kind, n in status["workers_alive"].items()) or "none"
    rows = [["  kind", "name", "host:pid", "serves", "beat"]]
    for worker in status["workers"]:
        version = worker["version"]
        rows.append(
            [
                f"  {worker['kind']}",
                worker["name"],
                f"{worker['host']}:{worker['pid']}",
                _serves(version, worker.get("canary")),
                f"{worker['beat_age_s']:.1f}s ago",
            ]
        )
    return [f"workers alive  {alive}", *(_table(rows, "<<<<>") if status["workers"] else [])]


def _serves(version: int | None, canary: int | None) -> str:
    if version is None:
        return "-"
    return f"v{version}" if canary is None else f"v{version}, canary v{canary}"


def _render_models(models: dict[str, dict[str, float]]) -> list[str]:
    rows = [["per model version", "trades", "losses", "loss rate", "mean loss", "signals"]]
    for version, row in models.items():
        traded = row["trades"] > 0
        rows.append(
            [
                f"  {version}",
                row["trades"],
                row["losses"],
                f"{row['loss_rate']:.1%}" if traded else "-",
                f"{row['mean_loss_pct']:.2f}%" if traded else "-",
                row["signals"],
            ]
        )
    return _table(rows, "<")


def _render_counters(counters: dict[str, float]) -> list[str]:
    text = ", ".join(f"{name}={value}" for name, value in counters.items()) or "none"
    return textwrap.wrap(f"counters  {text}", width=100, subsequent_indent="  ")


def _table(rows: list[list[Any]], align: str) -> list[str]:
    """Rows as aligned columns: column i left-aligned where align[i] is '<', else right
    (columns past the end of `align` are right-aligned: numbers)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    aligns = [align[i] if i < len(align) else ">" for i in range(len(widths))]
    return [
        "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, aligns, widths, strict=True)).rstrip()
        for row in cells
    ]


def _render_memory(memory: dict[str, Any]) -> list[str]:
    limit = memory["maxmemory_bytes"]
    lines = [
        f"memory  used {_bytes(memory['used_memory_bytes'])}"
        f"{f' on {n} nodes' if (n := memory.get('nodes', 1)) > 1 else ''} (dataset "
        f"{_bytes(memory['used_memory_dataset_bytes'] or 0)}, maxmemory "
        f"{_bytes(limit) if limit else 'none'}); by key family, "
        f"{_bytes(memory['accounted_bytes'])} accounted for:"
    ]
    rows = [
        [f"  {family}", f"{row['keys']:,} keys", _bytes(row["bytes"]), row["how"]]
        for family, row in memory["families"].items()
        if row["bytes"]
    ]
    return lines + (_table(rows, "<>><") if rows else ["  (empty)"])


def _bytes(n: float) -> str:
    """Bytes for people: 512 B, 1.5 KB, 12.3 MB, 2.0 GB."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"
