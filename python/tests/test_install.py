"""Packaging (issue 5, item 2): the package builds into a wheel with nothing compiled, installs, and the installed
copy imports and finds the library. Offline: no build isolation, so it needs setuptools >= 70.1 (or the `wheel`
package) in this interpreter; .ci/run installs `wheel`."""
import importlib.util
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

PYTHON_DIR = pathlib.Path(__file__).resolve().parents[1]


def can_build_offline():
    if importlib.util.find_spec("setuptools") is None:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    import setuptools

    return tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (70, 1)


@pytest.mark.skipif(not can_build_offline(), reason="needs setuptools >= 70.1 or the wheel package (offline build)")
def test_wheel_builds_installs_and_imports(tmp_path):
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    subprocess.run(["cp", "-r", str(PYTHON_DIR), str(src)], check=True)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(wheels), str(src)], check=True)
    (wheel,) = wheels.glob("epcomm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "epcomm/buffer.py" in names and "epcomm/_capi.py" in names
    assert not any(n.endswith((".so", ".c", ".pyd")) for n in names), "a pure-Python wheel was expected"
    assert wheel.name.endswith("-py3-none-any.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    "--target", str(target), str(wheel)], check=True)
    probe = ("import epcomm, epcomm._capi as c; "
             "assert epcomm.__file__.startswith(%r), epcomm.__file__; "
             "print(c.lib().ep_status_string(0).decode())" % str(target))
    env = dict(os.environ, PYTHONPATH=str(target))
    run = subprocess.run([sys.executable, "-c", probe], env=env, cwd=str(tmp_path), capture_output=True, text=True)
    assert run.returncode == 0, f"the installed package failed (exit {run.returncode}):\n{run.stderr}"
    assert run.stdout.strip(), "the installed package did not reach the library"
