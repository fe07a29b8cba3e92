"""Runs the tests against the package in this checkout (no install needed) and the library that
EPCOMM_LIBRARY names or the search of epcomm._capi finds (see README.md, "Python binding")."""
import os
import sys

import pytest

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(PYTHON_DIR)
if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)


@pytest.fixture(scope="session")
def capi():
    """epcomm._capi with the library loaded; a test that needs it fails (not skips) when it is missing, so
    that CI cannot pass without having tested the binding."""
    from epcomm import _capi

    _capi.load_library()
    return _capi


@pytest.fixture(scope="session")
def header_path():
    return os.path.join(REPO_ROOT, "include", "epcomm.h")
