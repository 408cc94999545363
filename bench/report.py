"""The machine and version header of every record, the terminal table, the JSON file."""

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch


def device_name(device):
    """The GPU's name, or 'cpu'."""
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def safe_name(name):
    """A file-system-safe form of a device name: 'NVIDIA H200' -> 'NVIDIA_H200'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unknown"


def _git_revision():
    """The checkout's commit (with '-dirty' when it has changes), or None outside a checkout.

    Read-only: GIT_OPTIONAL_LOCKS=0 keeps git from refreshing the index.
    """
    here = Path(__file__).resolve().parent
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=here,
                             env=env, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def header(device):
    """The fields every record carries: device, versions, commit, date."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import softmax_ce_gpu
        ours = softmax_ce_gpu.__version__
    except ImportError:
        ours = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "softmax_ce_gpu": ours,
        "python": platform.python_version(),
        "git": _git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timer": "triton.testing.do_bench" if device == "cuda" else "time.perf_counter",
    }


def write_json(records, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1, allow_nan=False) + "\n")
    return path


def read_json(paths):
    """Records from one or more JSON files written by write_json (or a directory of them)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    records = []
    for f in files:
        records.extend(json.loads(f.read_text()))
    return records


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


COLUMNS = ("op", "mode", "dtype", "shape", "provider", "status", "ms", "p20-p80", "GB/s",
           "of copy", "vs torch", "peak MB", "max err", "note")


def _row(r):
    return (r["op"], r["mode"], r["dtype"], f"{r['n']}x{r['v']}", r["provider"], r["status"],
            _fmt(r["ms"], ".4f"),
            "-" if r["ms"] is None else f"{r['ms_p20']:.4f}-{r['ms_p80']:.4f}",
            _fmt(r["gbps"], ".1f"),
            "-" if r["fraction_of_copy_bw"] is None else f"{100 * r['fraction_of_copy_bw']:.0f}%",
            "-" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}x",
            _fmt(r["peak_extra_mb"], ".1f"),
            _fmt(r["max_rel_err"], ".1e"),
            r.get("note") or "")


def table(records):
    """A plain-text table, one line per record, then the reasons of the cases that did not run."""
    rows = [COLUMNS] + [_row(r) for r in records]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for k, row in enumerate(rows):
        cells = [str(c).rjust(w) if 6 <= i < len(COLUMNS) - 1 else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    why = {}  # (provider, status, reason) -> the cases it applies to
    for r in records:
        if r["status"] != "ok":
            why.setdefault((r["provider"], r["status"], r["reason"]), []).append(
                f"{r['op']} {r['mode']} {r['dtype']} {r['n']}x{r['v']}")
    if why:
        lines += ["", "not timed:"]
        for (provider, status, reason), cases in why.items():
            where = cases[0] if len(cases) == 1 else f"{len(cases)} cases"
            lines.append(f"  {provider} ({where}): {status}: {reason}")
    return "\n".join(lines)
