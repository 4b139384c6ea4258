"""What every benchmark records beside its numbers (DESIGN.md rule 12): git sha, device, library versions,
machine load, and a results JSON written atomically.

Only the standard library, torch and ingot.formats: a GPU host without transformers or gguf runs every bench.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import platform
import re
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import torch

from ingot.formats.safetensors_io import write_json


def git_info(path: Path | None = None) -> dict:
    """{"sha", "dirty"} of the git checkout holding ``path`` (default: the ingot sources); None when not a checkout.

    dirty: tracked files differ from HEAD (untracked files are ignored), i.e. the numbers may not be HEAD's.
    """
    where = str(path or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"sha": None, "dirty": None}
    if sha.returncode != 0:
        return {"sha": None, "dirty": None}
    return {"sha": sha.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(devices: tuple[str, ...] | list[str]) -> dict:
    """The machine: CPU model and cores always; for each CUDA device used, its name, memory and capability."""
    info: dict = {
        "cpu": {
            "model": cpu_model(),
            "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        },
        "memory_bytes": _meminfo("MemTotal"),
        "gpus": [],
    }
    for dev in devices:
        if dev.startswith("cuda") and torch.cuda.is_available():
            d = torch.device(dev)
            props = torch.cuda.get_device_properties(d.index or 0)
            info["gpus"].append({
                "device": dev,
                "name": props.name,
                "memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}",
                "cuda": torch.version.cuda,
            })
    return info


def device_slug(info: dict) -> str:
    """A file-name-safe name of the device a result belongs to: the first GPU's, else the CPU's."""
    name = info["gpus"][0]["name"] if info["gpus"] else "cpu-" + info["cpu"]["model"]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def software_info() -> dict:
    """Versions a result depends on (transformers and tokenizers: an eval's token windows come from them)."""
    import importlib.metadata as metadata

    import safetensors

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "platform": platform.platform(),
    }
    for name in ("triton", "transformers", "tokenizers"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: on a shared machine, wall-clock numbers mean little without them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def filesystem(path: Path) -> str | None:
    """The type of the filesystem holding ``path`` (ext4, xfs, tmpfs, ...) from /proc/mounts; None elsewhere.

    tmpfs keeps files in RAM: writes cost no disk. On a disk, buffered writes cost page-cache work and, past the
    dirty limits, the disk's own speed.
    """
    try:
        target = str(Path(path).resolve())
        best, fstype = "", None
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1].replace("\\040", " ")
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, fstype = mount, fields[2]
        return fstype
    except (OSError, IndexError):
        return None


def page_cache_fraction(paths: list[Path]) -> float | None:
    """Fraction of the bytes of ``paths`` resident in the page cache (mincore), or None where unsupported.

    A converter reading from the page cache measures CPU work; one reading a cold disk measures the disk.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        resident = total = 0
        for path in paths:
            size = path.stat().st_size
            if size == 0:
                continue
            with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
                if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                    return None
                resident += sum(v & 1 for v in vec)
                total += pages
        return resident / total if total else None
    except (OSError, AttributeError, ValueError, TypeError):
        return None


class TreeRssSampler(threading.Thread):
    """Samples the summed RSS of a process and all its descendants every ``interval`` seconds (Linux /proc).

    ru_maxrss is per process: for a converter with worker processes it gives the largest one, not what the
    machine must hold at once. This gives the latter, to within the sampling interval.
    """

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_bytes = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            total = _tree_rss(self.pid)
            if total is not None:
                self.peak_bytes = max(self.peak_bytes, total)
                self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> int | None:
        self._stop_event.set()
        self.join()
        return self.peak_bytes if self.samples else None


def _tree_rss(root: int) -> int | None:
    try:
        parents: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(entry.path, "stat").read_text()
                except OSError:
                    continue
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    except OSError:
        return None
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return total


def default_results_path(bench: str, slug: str) -> Path:
    """benchmarks/results/<bench>-<device-slug>-<YYYYMMDD>.json, relative to the working directory."""
    return Path("benchmarks") / "results" / f"{bench}-{slug}-{datetime.now().strftime('%Y%m%d')}.json"


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_stamp(bench: str, command: str, devices: tuple[str, ...] | list[str], git_sha: str | None = None) -> dict:
    """The fields every results JSON opens with: bench, command, timestamp, git (``git_sha`` stands in for a tree
    copied without .git, as on the GPU machine), device, software and load average."""
    git = git_info()
    if git_sha:
        git = {"sha": git_sha, "dirty": None, "note": "given with --git-sha"}
    return {"bench": bench, "command": command, "timestamp": timestamp(), "git": git, "device": device_info(devices),
            "software": software_info(), "load_average": load_average()}


def write_results(path: Path, results: dict) -> Path:
    """Write a results JSON atomically (sorted keys, stable bytes), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, results)
    return path


def gpu_script_args() -> argparse.Namespace:
    """The command line of the GPU scripts under benchmarks/scripts: --out FILE.json, and --git-sha SHA for the tree's
    commit where the GPU machine's copy of it has no .git."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--git-sha")
    return ap.parse_args()


def graph_replay_us(fn, rep_ms: int) -> float:
    """Median microseconds of one ``fn()`` replayed in a CUDA graph (triton's graph timer, after a first call that
    compiles outside the capture), rounded to 0.01."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return round(do_bench_cudagraph(fn, rep=rep_ms) * 1000, 2)
