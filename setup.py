"""Package layout: everything installs under ``hivewire.*`` (README.md, Architecture)."""

from setuptools import find_packages, setup

ROOTS = {
    "hivewire": "gen/hivewire",
    "hivewire.services": "services",
    "hivewire.discovery": "discovery",
}


def _packages() -> list[str]:
    found: list[str] = []
    for name, path in ROOTS.items():
        found.append(name)
        found.extend(f"{name}.{sub}" for sub in find_packages(path))
    return found


setup(
    packages=_packages(),
    package_dir=ROOTS,
    package_data={
        "": ["py.typed", "*.pyi", "*.proto"],
        "hivewire.services.dashboard": ["index.html"],
        "hivewire.services.runtime": ["default_authz_policy.toml"],
    },
)
