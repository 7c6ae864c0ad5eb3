"""The distribution installs every package on disk, under import names of our own."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
INSTALLED_AS = {"common": "mksuite.common", "architectures": "mksuite.architectures"}
TOOLS = ("mkmerge", "mkstack", "mkmoe", "mksuite")  # mksuite/: the Python API (its engine is common/)


def packages_on_disk() -> set[str]:
    found = set()
    for folder in (*INSTALLED_AS, *TOOLS):
        name = INSTALLED_AS.get(folder, folder)
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join((name, *init.parent.relative_to(ROOT / folder).parts)))
    return found


def test_every_package_on_disk_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == packages_on_disk()
    assert config["package-dir"] == {name: folder for folder, name in INSTALLED_AS.items()}


def test_engine_imports_under_the_mksuite_name():
    import mksuite.architectures
    import mksuite.common.errors

    assert Path(mksuite.common.errors.__file__).parent == ROOT / "common"
    assert Path(mksuite.architectures.__file__).parent == ROOT / "architectures"


def test_no_module_imports_a_bare_common_package():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("from common", "import common", "from architectures", "import architectures")):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert offenders == []
