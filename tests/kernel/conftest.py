"""Real kernels for the tests: lab kernels (built once, cached) and Debian's distro vmlinux."""

import pytest

from kbuild_bolt.lab.distro import distro_kernel
from kbuild_bolt.lab.kernels import FLAVORS, lab_kernel

# (the debug-info flavor serves the DWARF tests only)
LAB_FLAVORS = tuple(f for f in FLAVORS if not f.endswith("-debug"))


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/kernel/" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session", params=LAB_FLAVORS)
def lab(request):
    """Each lab kernel in turn (built on first use; one build at a time)."""
    return lab_kernel(request.param)


@pytest.fixture(scope="session")
def lab_regular():
    return lab_kernel("6.12-regular")


@pytest.fixture(scope="session")
def distro():
    return distro_kernel()
