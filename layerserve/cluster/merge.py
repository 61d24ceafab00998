"""What the ingress assembles from every replica's answer: one /metrics page with a `replica`
label on every sample, and one session list."""

from __future__ import annotations

import re
from typing import Any

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?(\s.*)")


def short_name(replica: str) -> str:
    """A replica's label: the unique part of Ray's full id (app#deployment#unique)."""
    return replica.rsplit("#", 1)[-1]


def label_samples(text: str, replica: str) -> list[tuple[str | None, str]]:
    """(family or None for a comment, line) for each line of a Prometheus text page, with
    `replica="..."` added to every sample."""
    label = f'replica="{short_name(replica)}"'
    out: list[tuple[str | None, str]] = []
    family = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                family = parts[2]
            out.append((None, line))
            continue
        match = _SAMPLE.fullmatch(line)
        if match is None:
            continue
        name, labels, rest = match.groups()
        labels = "{" + label + ("," + labels[1:] if labels and labels != "{}" else "}")
        out.append((family or name, name + labels + rest))
    return out


def merge_metrics(pages: dict[str, str], extra: str = "") -> str:
    """One page from each replica's page (replica name -> text): each family's HELP and TYPE once,
    then its samples from every replica."""
    order: list[str] = []
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in sorted(pages.items()):
        pending: list[str] = []
        for family, line in label_samples(text, replica):
            if family is None:
                pending.append(line)
                continue
            if family not in samples:
                order.append(family)
                samples[family] = []
                headers[family] = [c for c in pending if c.split(None, 3)[2:3] == [family]]
            pending = []
            samples[family].append(line)
    lines = [line for family in order for line in (*headers[family], *samples[family])]
    return "\n".join(lines) + "\n" + extra


def merge_sessions(lists: list[dict[str, Any]], created_ms: dict[str, int] | None = None) -> dict[str, Any]:
    """One `{"object": "list", "data": [...]}` from each replica's, in creation order: by the
    sessions' creation milliseconds where known (the hidden key a single server sorts by), else
    their `created` second, then id."""
    created_ms = created_ms or {}
    seen: dict[str, dict[str, Any]] = {}
    for body in lists:
        for session in body.get("data", []):
            seen.setdefault(session["id"], session)

    def key(s: dict[str, Any]) -> tuple[int, str]:
        return created_ms.get(s["id"], s.get("created", 0) * 1000), s["id"]

    return {"object": "list", "data": sorted(seen.values(), key=key)}
