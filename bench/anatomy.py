"""What an adoption copies (bench/fleet_floor.py's floor): how much of a
process's memory is mapped with 2 MB pages, and which pages a process owns
rather than shares with the one it was forked from, by kind of mapping,
from /proc/PID/smaps_rollup and /proc/PID/pagemap (page frames are shown
to root only; elsewhere the counts are None)."""

from __future__ import annotations

import struct
from collections import Counter


def huge_mb(pid: int) -> float | None:
    """MB of a process's anonymous memory mapped with 2 MB pages (each a
    single page-table entry for a fork to copy), from smaps_rollup."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _maps(pid: int) -> list[tuple[int, int, str, str]]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out


def _frames(pid: int, start: int, end: int) -> list[int]:
    """The page frame of each page of [start, end), 0 where none is present
    (/proc/PID/pagemap; frames are read as root only, else all 0)."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // 4096 * 8)
        data = f.read((end - start) // 4096 * 8)
    return [e & ((1 << 55) - 1) if e >> 63 else 0 for e in struct.unpack(f"{len(data) // 8}Q", data)]


def _mapping_kind(perm: str, path: str) -> str:
    if path == "[heap]":
        return "heap"
    if path == "[stack]":
        return "stack"
    if not path:
        return "other anonymous"
    return "libraries' data" if "w" in perm else "libraries' read-only"


def frames_by_page(pid: int) -> dict[int, tuple[int, str]] | None:
    """Every present page of the writable mappings of a process: address ->
    (page frame, kind of mapping). None when frames cannot be read (they
    are shown to root only)."""
    out = {}
    try:
        for start, end, perm, path in _maps(pid):
            if "w" not in perm:
                continue
            kind = _mapping_kind(perm, path)
            for i, frame in enumerate(_frames(pid, start, end)):
                if frame:
                    out[start + 4096 * i] = (frame, kind)
    except OSError:
        return None
    return out if out else None


def own_pages(mine: dict[int, tuple[int, str]] | None,
              *others: dict[int, tuple[int, str]] | None) -> dict[str, int] | None:
    """The pages of `mine` whose frame none of `others` has at that address
    (copied on write, or new), counted by kind of mapping."""
    if mine is None or any(o is None for o in others):
        return None
    out: Counter[str] = Counter()
    for addr, (frame, kind) in mine.items():
        if all(o.get(addr, (0, ""))[0] != frame for o in others):  # type: ignore[union-attr]
            out[kind] += 1
    return dict(out)


def mapping_count(pid: int) -> int:
    return len(_maps(pid))


def anatomy_line(a: dict) -> str:
    """One line: the base's memory in 2 MB pages before and after serving,
    and the pages a vassal's master and worker own, by mapping."""
    def pages(d: dict | None) -> str:
        if d is None:
            return "n/a (page frames need root)"
        return f"{sum(d.values())} (" + ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) + ")"

    def mb(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.0f} MB"
    return (f"base in 2 MB pages: {mb(a.get('base_huge_mb_ready'))} ready, {mb(a.get('base_huge_mb_after'))} after "
            f"the adoptions; the last vassal ({a.get('mappings', '?')} mappings) owns, as it answers: master "
            f"{pages(a.get('master_own_pages'))}, worker "
            + ("none (master = false)" if a.get("master_own_pages") is not None and "worker_own_pages" not in a
               else pages(a.get("worker_own_pages"))))
