"""The echo baseline under two grpcio releases: 1.75.0 and the newest.

grpcio 1.75.1 and later carry a grpc.aio per-call regression (grpc/grpc#43092), which
is why pyproject.toml keeps ``grpcio<1.75.1``. This script shows the difference on the
machine at hand: it builds throwaway virtual environments under a cache directory
(``pip install grpcio==<v> protobuf==<this environment's protobuf>`` from PyPI), runs
:mod:`bench.echo` in each, rounds interleaved so both see the same machine weather,
and prints the ratios (newest / 1.75.0)::

    python bench/grpcio_versions.py [--quick] [--versions 1.75.0 latest] [--rounds 5]

``latest`` means the newest grpcio on the index (upgraded on every run). The
environments live in ``$HIVEWIRE_BENCH_CACHE`` (default ``~/.cache/hivewire-bench``);
delete the directory to rebuild them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script (python bench/grpcio_versions.py): make ``bench`` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Inherited by the echo processes: quiet gRPC's informational lines on stderr.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from google.protobuf import __version__ as protobuf_version

from bench.common import (
    DEFAULT,
    QUICK,
    ROOT,
    Durations,
    Phase,
    cpu_total,
    fmt_rate,
    fmt_spread,
    fmt_time,
    inverse_rate,
    median_phase,
    p50,
    paired_ratios,
    table,
)

DEFAULT_VERSIONS = ("1.75.0", "latest")


def cache_dir() -> Path:
    """Where the throwaway environments are kept."""
    configured = os.environ.get("HIVEWIRE_BENCH_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hivewire-bench"


async def _run(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({process.returncode}):\n{err.decode(errors='replace')}"
        )
    return out.decode()


async def ensure_env(version: str, cache: Path) -> Path:
    """Create (once) the environment for a grpcio version; return its python.

    The environment holds grpcio and the same protobuf as this one, nothing else.
    """
    env = cache / f"grpcio-{version}"
    python = env / "bin" / "python"
    marker = env / "hivewire-bench.json"
    wanted = {"grpcio": version, "protobuf": protobuf_version}
    if version != "latest" and marker.exists() and json.loads(marker.read_text()) == wanted:
        return python
    if not python.exists():
        await _run(sys.executable, "-m", "venv", str(env))
    requirement = "grpcio" if version == "latest" else f"grpcio=={version}"
    await _run(
        str(python),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--upgrade",
        requirement,
        f"protobuf=={protobuf_version}",
    )
    marker.write_text(json.dumps(wanted))
    return python


async def _echo_once(python: Path, certs: Path, durations: Durations) -> dict[str, Any]:
    out = await _run(
        str(python),
        "-m",
        "bench.echo",
        "run",
        "--certs",
        str(certs),
        "--json",
        "--rounds",
        "1",
        "--measure",
        str(durations.measure),
        *(["--quick"] if durations.warmup < DEFAULT.warmup else []),
    )
    data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return data


async def measure(
    *,
    durations: Durations,
    versions: Sequence[str] = DEFAULT_VERSIONS,
    cache: Path | None = None,
    certs: Path | None = None,
) -> dict[str, Any]:
    """Run the echo baseline under each grpcio version, rounds interleaved.

    Returns:
        ``{"versions": {resolved version: {phase: Phase}}, "protobuf": ...}`` in the
        order of ``versions``.
    """
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    pythons = {v: await ensure_env(v, cache) for v in versions}
    with tempfile.TemporaryDirectory(prefix="hivewire-bench-certs-") as tmp:
        if certs is None:
            from hivewire.services.mesh.pki import init_pki

            certs = Path(tmp)
            init_pki(certs)
        resolved: dict[str, str] = {}
        rounds: dict[str, dict[str, list[Phase]]] = {v: {} for v in versions}
        for _ in range(durations.rounds):
            for version, python in pythons.items():
                data = await _echo_once(python, certs, durations)
                resolved[version] = data["grpcio"]
                for name, phase in data["phases"].items():
                    rounds[version].setdefault(name, []).append(Phase.from_dict(phase))
    return {
        "protobuf": protobuf_version,
        "rounds": {resolved[v]: rounds[v] for v in versions},
        "versions": {
            resolved[v]: {name: median_phase(p) for name, p in rounds[v].items()} for v in versions
        },
    }


def report(result: dict[str, Any]) -> str:
    """Per-version numbers and the per-round ratios of the last version to the first."""
    versions: dict[str, dict[str, Phase]] = result["versions"]
    rounds: dict[str, dict[str, list[Phase]]] = result["rounds"]
    names = list(versions)
    old, new = names[0], names[-1]
    rows = []
    for phase_name, base in versions[old].items():
        cur = versions[new][phase_name]
        old_rounds, new_rounds = rounds[old][phase_name], rounds[new][phase_name]
        rows.append(
            [
                phase_name,
                f"{fmt_rate(base.rate)} / {fmt_rate(cur.rate)}",
                fmt_spread(paired_ratios(new_rounds, old_rounds, inverse_rate)),
                f"{fmt_time(p50(base))} / {fmt_time(p50(cur))}",
                fmt_spread(paired_ratios(new_rounds, old_rounds, p50)),
                f"{base.cpu_total_us:.0f} / {cur.cpu_total_us:.0f}",
                fmt_spread(paired_ratios(new_rounds, old_rounds, cpu_total)),
            ]
        )
    return table(
        f"grpcio {old} vs {new}: bare grpc.aio echo over mTLS, protobuf {result['protobuf']}, "
        f"{len(next(iter(rounds[old].values())))} interleaved rounds; ratio = cost under {new} "
        f"/ cost under {old}, per round: median (min-max), >1 = slower",
        [
            "phase",
            "rate old / new",
            "time per call",
            "p50 old / new",
            "p50",
            "CPU µs/op old / new",
            "CPU/op",
        ],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, build the environments, measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; quick 2)")
    parser.add_argument("--versions", nargs="+", default=list(DEFAULT_VERSIONS))
    parser.add_argument("--cache", type=Path, help="environment cache directory")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    rounds = args.rounds or (2 if args.quick else 5)
    durations = Durations(warmup=base.warmup, measure=base.measure, rounds=rounds)
    result = asyncio.run(measure(durations=durations, versions=args.versions, cache=args.cache))
    sys.stdout.write(report(result) + "\n")
    if args.json:
        versions = {
            v: {n: p.to_dict() for n, p in phases.items()}
            for v, phases in result["versions"].items()
        }
        per_round = {
            v: {n: [p.to_dict() for p in ps] for n, ps in phases.items()}
            for v, phases in result["rounds"].items()
        }
        document = {**result, "versions": versions, "rounds": per_round}
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
