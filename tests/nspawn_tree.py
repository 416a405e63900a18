"""A small Debian tree that boots real systemd in ``systemd-nspawn``, for
``tests/test_systemd_boot.py``.

    sudo .venv/bin/python -m tests.nspawn_tree [ROOT]

builds it (debootstrap of Debian 12 with systemd and python3, then a venv in
/opt/lazypaged with lazypaged's dependencies from PyPI): a few minutes,
once. lazypaged itself is not copied in: the tests bind the checkout at
``SRC`` and the venv finds it there (a .pth file), so the container always
runs the code under test. ``/usr/local/bin/lazypaged`` is the console
script, where the unit's ``ExecStart=lazypaged`` finds it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

DEFAULT_ROOT = Path(os.environ.get("LAZYPAGED_NSPAWN_ROOT", "/var/tmp/lazypaged-nspawn/root"))
MIRROR = os.environ.get("LAZYPAGED_DEBIAN_MIRROR", "http://deb.debian.org/debian")
#: Where the checkout is bound inside the container.
SRC = "/opt/lazypaged-src"
VENV = "/opt/lazypaged"
#: Bumped when the tree's recipe changes, so old trees are rebuilt.
RECIPE = "1"
_MARK = ".lazypaged-tree"
_CA = "/etc/ssl/certs/ca-certificates.crt"


def ready(root: Path) -> bool:
    mark = root / _MARK
    return mark.exists() and mark.read_text().strip() == RECIPE


def tools_missing() -> list[str]:
    return [t for t in ("systemd-nspawn", "debootstrap", "nsenter") if shutil.which(t) is None]


def _dependencies() -> list[str]:
    with open(Path(__file__).parent.parent / "pyproject.toml", "rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    return deps


def build(root: Path) -> None:
    if ready(root):
        return
    if os.geteuid() != 0:
        raise SystemExit("building the tree needs root")
    missing = tools_missing()
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (apt-get install systemd-container debootstrap)")
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus,python3,python3-venv",
         "bookworm", str(root), MIRROR],
        check=True,
    )
    env = ["--setenv=PIP_DISABLE_PIP_VERSION_CHECK=1"]
    binds = []
    if Path(_CA).exists():  # the host's CAs (a TLS-inspecting proxy's among them)
        binds.append(f"--bind-ro={_CA}:/etc/host-ca.crt")
        env.append("--setenv=PIP_CERT=/etc/host-ca.crt")
    deps = " ".join(f"'{d}'" for d in _dependencies())
    script = f"python3 -m venv {VENV} && {VENV}/bin/pip install -q {deps}"
    subprocess.run(
        ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--pipe", "-D", str(root), *binds, *env,
         "/bin/sh", "-c", script],
        check=True,
    )
    site = next((root / VENV.lstrip("/") / "lib").glob("python3*/site-packages"))
    (site / "lazypaged-src.pth").write_text(SRC + "\n")
    script_path = root / "usr/local/bin/lazypaged"
    script_path.write_text(f"#!{VENV}/bin/python3\nimport sys\n\nfrom lazypaged.cli import main\n\nsys.exit(main())\n")
    script_path.chmod(0o755)
    (root / _MARK).write_text(RECIPE + "\n")


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_ROOT)
    print(DEFAULT_ROOT if len(sys.argv) < 2 else sys.argv[1])
