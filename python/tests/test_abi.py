"""ABI check: a C program compiled against include/epcomm.h prints the size and every field offset of each
public struct, and the value of every enum constant and macro the mirror copies; epcomm._capi must agree."""
import ctypes
import os
import shutil
import subprocess

import pytest

from epcomm import _capi

CC = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (gcc) to build the ABI probe")

CONSTANTS = ["EP_MAX_DIMS", "EP_UNIQUE_ID_BYTES", "EP_VERSION_MAJOR", "EP_VERSION_MINOR", "EP_VERSION_PATCH",
             "EP_VERSION_CODE"] + [s.name for s in _capi.Status] + [d.name for d in _capi.DType]


def probe_source():
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "epcomm.h"', "int main(void) {"]
    for cls in _capi.PUBLIC_STRUCTS:
        name = cls.__name__
        lines.append(f'    printf("{name} sizeof %zu\\n", sizeof({name}));')
        for field, _ in cls._fields_:
            lines.append(f'    printf("{name} {field} %zu\\n", offsetof({name}, {field}));')
    for const in CONSTANTS:
        lines.append(f'    printf("const {const} %lld\\n", (long long)({const}));')
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_facts(tmp_path_factory, header_path):
    work = tmp_path_factory.mktemp("abi")
    src, exe = work / "probe.c", work / "probe"
    src.write_text(probe_source())
    cmd = [CC, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", os.path.dirname(header_path), str(src), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, f"the probe does not compile (a field name differs?):\n{build.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    facts = {}
    for line in out.splitlines():
        a, b, value = line.split()
        facts[(a, b)] = int(value)
    return facts


@pytest.mark.parametrize("cls", _capi.PUBLIC_STRUCTS, ids=lambda c: c.__name__)
def test_struct_size_and_field_offsets_match_the_header(c_facts, cls):
    name = cls.__name__
    assert ctypes.sizeof(cls) == c_facts[(name, "sizeof")], f"sizeof({name})"
    for field, _ in cls._fields_:
        assert getattr(cls, field).offset == c_facts[(name, field)], f"offsetof({name}, {field})"


def test_constants_match_the_header(c_facts):
    mirror = {s.name: int(s) for s in _capi.Status}
    mirror.update({d.name: int(d) for d in _capi.DType})
    mirror.update({c: getattr(_capi, c) for c in CONSTANTS[:6]})
    for const in CONSTANTS:
        assert mirror[const] == c_facts[("const", const)], const


def test_every_header_enum_constant_is_mirrored(header_path):
    import re

    text = open(header_path).read()
    in_header = set(re.findall(r"^\s*(EP_(?:ERROR_\w+|SUCCESS|DTYPE_\w+))\s*=", text, re.M))
    assert in_header == {s.name for s in _capi.Status} | {d.name for d in _capi.DType}
