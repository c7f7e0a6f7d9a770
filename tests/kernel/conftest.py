"""Real kernels for the tests: lab kernels (built once, cached) and Debian's distro vmlinux."""

import pytest

from kbuild_bolt.lab.distro import distro_kernel
from kbuild_bolt.lab.kernels import FLAVORS, lab_kernel

# The kernels every lab test runs on (the debug-info flavor serves the DWARF
# tests only, the module-heavy one the disk and module tests).
LAB_FLAVORS = ("6.12-regular", "6.12-hardened", "6.1-regular")
assert set(LAB_FLAVORS) <= set(FLAVORS)


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
