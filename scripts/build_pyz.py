"""Build the zipapp from shiv.toml and requirements.lock (shiv reads no config file).

    python scripts/build_pyz.py                            # this machine: dist/botonera-bridge.pyz
    python scripts/build_pyz.py --platform linux-aarch64   # dist/botonera-bridge-linux-aarch64.pyz

The runtime dependencies are the lock's pins (hash-checked) of what the project needs
at run time, nothing of the dev tools; for another platform pip fetches that
platform's wheels (``--only-binary=:all:``), so a 64-bit Raspberry Pi build is made on
any Linux machine. A preamble (run by shiv before the entry point) refuses a Python
minor other than the one the wheels were built for, with one line, removes older
extractions of the zipapp from SHIV_ROOT that no running process uses, and for ``run``
execs a fresh interpreter on the extracted site-packages (the bootstrap's leftovers
cost 1.4 MB of idle RSS).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "botonera-bridge"
# --platform NAME -> (pip --platform tags, platform_machine for markers)
PLATFORMS = {
    "linux-aarch64": (
        ["manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64"],
        "aarch64",
    ),
    "linux-x86_64": (
        ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"],
        "x86_64",
    ),
}

# Required by typer's metadata, never imported by the bridge: cli.py sets
# rich_markup_mode=None and pretty_exceptions_enable=False, so typer formats help and
# errors with plain click. Left out with their own dependencies (pygments, markdown-it):
# 1.6 MB less to ship and extract, and no rich import on any path.
LEFT_OUT = frozenset({"rich"})

PREAMBLE = '''\
"""botonera-bridge .pyz preamble (written by scripts/build_pyz.py)."""
import os, shutil, sys
from pathlib import Path

BUILT_FOR = {built_for!r}
PLATFORM = {platform!r}
if sys.version_info[:2] != BUILT_FOR:
    sys.stderr.write(
        "botonera-bridge: este .pyz fue construido para Python %d.%d (%s), no para Python %s: "
        "ejecútelo con python%d.%d o construya uno con este Python (make pyz)\\n"
        % (*BUILT_FOR, PLATFORM, sys.version.split()[0], *BUILT_FOR)
    )
    sys.exit(2)


def _in_use(path):
    """Some process maps a file under path (a running bridge maps msgspec's .so)."""
    needle = str(path) + "/"
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "maps").read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


def _clean_old(current):
    stem = current.name.rsplit("_", 1)[0]
    for old in current.parent.glob(stem + "_*"):
        if old == current or not old.is_dir() or old.name.endswith(".tmp"):
            continue
        try:
            if not _in_use(old):
                shutil.rmtree(old, ignore_errors=True)
                (old.parent / ("." + old.name + "_lock")).unlink(missing_ok=True)
        except OSError:
            pass


if os.environ.get("BOTONERA_PYZ_KEEP_OLD") != "1":
    _clean_old(Path(site_packages).parent)  # noqa: F821 - given by shiv's bootstrap

# The daemon goes on in a fresh interpreter on the extracted site-packages: what shiv's
# bootstrap left in this one's heap (zipfile, compileall, the archive's directory, their
# garbage) would stay for the process's life, +1.4 MB of idle RSS over the installed
# package. exec keeps the PID (systemd, signals) and the interpreter's options; -P: the
# working directory is not put on sys.path (as for the .pyz). BOTONERA_PYZ_REEXEC=0 stays
# in this interpreter.
if (
    "run" in sys.argv[1:] and sys.executable and env.entry_point  # noqa: F821
    and os.environ.get("BOTONERA_PYZ_REEXEC") != "0"
):
    _module, _func = env.entry_point.split(":")  # noqa: F821 - given by shiv's bootstrap
    _code = (
        "import sys; sys.argv[0] = %r; sys.path[:0] = [%r]; "
        "from %s import %s as main; sys.exit(main())"
    ) % (sys.argv[0], str(site_packages), _module, _func)  # noqa: F821
    _options = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]
    os.execv(sys.executable, [sys.executable, *_options, "-P", "-c", _code, *sys.argv[1:]])
'''


def runtime_closure(machine: str) -> set[str]:
    """Canonical names of everything the installed project needs at run time."""
    env = default_environment() | {"platform_machine": machine, "extra": ""}
    todo, seen = [PROJECT], set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or name in LEFT_OUT:
            continue
        seen.add(name)
        for spec in md.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    seen.discard(canonicalize_name(PROJECT))
    return seen


def lock_subset(lock: Path, names: set[str]) -> str:
    """The lock's entries (pin and hashes) for ``names``; fails if one is missing."""
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text())
    out, found = [], set()
    for entry in entries:
        m = re.match(r"([A-Za-z0-9._-]+)==", entry)
        if m and canonicalize_name(m.group(1)) in names:
            found.add(canonicalize_name(m.group(1)))
            kept = [ln for ln in entry.splitlines() if not ln.lstrip().startswith("#")]
            out.append("\n".join(kept))
    missing = names - found
    if missing:
        sys.exit(f"requirements.lock lacks {sorted(missing)}: run `make lock`")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--platform", default="", choices=["", *PLATFORMS])
    args = ap.parse_args()
    conf = tomllib.loads((ROOT / "shiv.toml").read_text())
    out = ROOT / conf["output"]
    tags, machine = PLATFORMS.get(args.platform, ([], ""))
    if args.platform:
        out = out.with_name(f"{out.stem}-{args.platform}{out.suffix}")
    machine = machine or default_environment()["platform_machine"]
    build = ROOT / "build" / f"pyz-{args.platform or 'host'}"
    shutil.rmtree(build, ignore_errors=True)
    site = build / "site-packages"
    site.mkdir(parents=True)
    reqs = build / "requirements.txt"
    reqs.write_text(lock_subset(ROOT / "requirements.lock", runtime_closure(machine)))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    target = ["--target", str(site), "--no-compile"]
    platform_args = [f"--platform={t}" for t in tags]
    if tags:
        pyver = f"{sys.version_info[0]}{sys.version_info[1]}"
        platform_args += ["--python-version", pyver, "--implementation", "cp", f"--abi=cp{pyver}"]
    cmd = [*pip, *target, "--require-hashes", "--only-binary=:all:", *platform_args]
    run([*cmd, "--no-deps", "-r", str(reqs)])
    run([*pip, *target, "--no-deps", "--no-build-isolation", str(ROOT)])
    built_for = (sys.version_info[0], sys.version_info[1])
    preamble = build / "preamble.py"
    preamble.write_text(
        PREAMBLE.format(built_for=built_for, platform=args.platform or f"linux-{machine}")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    shiv = [sys.executable, "-m", "shiv", "--site-packages", str(site), "-e", conf["entry_point"]]
    shiv += ["-o", str(out), "-p", conf["python"], "--preamble", str(preamble)]
    if conf.get("reproducible"):
        shiv.append("--reproducible")
    if conf.get("compile_pyc"):
        shiv.append("--compile-pyc")
    run(shiv)
    print(f"built {out.relative_to(ROOT)} ({out.stat().st_size // 1024} KiB, Python {built_for})")


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
