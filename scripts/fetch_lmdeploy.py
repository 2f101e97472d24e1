"""Fetch LMDeploy's Python layer for tests/llm/test_lmdeploy_contract.py (run by scripts/setup_env.sh).

Downloads the lmdeploy wheel (pip download --no-deps, ~106 MB, kept in .cache/wheels), unpacks its
Python files, without the compiled `_turbomind` engine and its libraries, into
.cache/lmdeploy-<version>/site, and installs the pure-Python packages its modules import
(requirements-lmdeploy-contract.txt) into .cache/lmdeploy-<version>/deps. Nothing goes into .venv.
Safe to run again (a marker records what was fetched); exits 0 with a warning when no package index can
be reached, so an offline setup still completes (the contract test then says why it skipped).

    python scripts/fetch_lmdeploy.py [--version 0.18.0]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements-lmdeploy-contract.txt"
DEFAULT_VERSION = "0.18.0"
# Everything under these wheel paths is the compiled engine or its build inputs: not unpacked.
SKIPPED_PARTS = ("lmdeploy/turbomind/lib/", "lmdeploy/turbomind/lib64/", "lmdeploy/turbomind/include/")


def layer_folder(version: str) -> Path:
    return ROOT / ".cache" / f"lmdeploy-{version}"


def marker_text(version: str) -> str:
    return f"{version} {hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()}\n"


def unpack(wheel: Path, target: Path) -> int:
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not name.startswith("lmdeploy/") or name.endswith(".so") or name.startswith(SKIPPED_PARTS):
                continue
            archive.extract(name, target)
            count += 1
    return count


def fetch(version: str) -> int:
    folder = layer_folder(version)
    marker = folder / ".complete"
    if marker.exists() and marker.read_text() == marker_text(version):
        return 0
    wheels = ROOT / ".cache" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    got = subprocess.run([*pip, "download", "--no-deps", "-d", str(wheels), f"lmdeploy=={version}"], check=False)
    found = sorted(wheels.glob(f"lmdeploy-{version}-*.whl"))
    if got.returncode != 0 or not found:
        print(f"warning: could not download lmdeploy=={version}; the LMDeploy contract test will skip", file=sys.stderr)
        return 0
    shutil.rmtree(folder, ignore_errors=True)
    files = unpack(found[-1], folder / "site")
    deps = subprocess.run([*pip, "install", "--no-deps", "--target", str(folder / "deps"), "-r", str(REQUIREMENTS)], check=False)
    if deps.returncode != 0:
        print("warning: could not install LMDeploy's pure-Python imports; the contract test will skip", file=sys.stderr)
        return 0
    marker.write_text(marker_text(version))
    print(f"LMDeploy {version} Python layer: {files} files in {folder / 'site'} (no compiled engine)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default=DEFAULT_VERSION)
    return fetch(parser.parse_args(argv).version)


if __name__ == "__main__":
    raise SystemExit(main())
