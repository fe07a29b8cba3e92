# Finds NCCL for epcomm: NCCL_HOME (CMake or environment variable) first, then the CUDA toolkit, then the
# `nvidia-nccl` Python package. Headers and library must be the same version, because kernels inline NCCL's
# device-side structures: configure fails if they differ.
#
# Sets: NCCL_INCLUDE_DIR, NCCL_LIBRARY, NCCL_LIBRARY_DIR, NCCL_VERSION_CODE, and the imported target
# epcomm::nccl.

function(_epcomm_python_nccl_root out)
  find_program(_py NAMES python3 python)
  set(${out} "" PARENT_SCOPE)
  if(NOT _py)
    return()
  endif()
  execute_process(
    COMMAND ${_py} -c "import nvidia.nccl as m; print(list(m.__path__)[0])"
    OUTPUT_VARIABLE _root OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND EXISTS "${_root}/include/nccl.h")
    set(${out} "${_root}" PARENT_SCOPE)
  endif()
endfunction()

set(_nccl_roots "")
if(NCCL_HOME)
  list(APPEND _nccl_roots "${NCCL_HOME}")
elseif(DEFINED ENV{NCCL_HOME})
  list(APPEND _nccl_roots "$ENV{NCCL_HOME}")
endif()
if(NOT _nccl_roots)
  list(APPEND _nccl_roots "${CUDAToolkit_LIBRARY_ROOT}" "${CUDAToolkit_TARGET_DIR}")
  _epcomm_python_nccl_root(_py_root)
  if(_py_root)
    list(APPEND _nccl_roots "${_py_root}")
  endif()
endif()

unset(NCCL_INCLUDE_DIR CACHE)
unset(NCCL_LIBRARY CACHE)
foreach(_root IN LISTS _nccl_roots)
  if(EXISTS "${_root}/include/nccl.h" AND EXISTS "${_root}/include/nccl_device.h")
    foreach(_libdir lib64 lib lib/x86_64-linux-gnu)
      foreach(_name libnccl.so libnccl.so.2)
        if(NOT NCCL_LIBRARY AND EXISTS "${_root}/${_libdir}/${_name}")
          set(NCCL_INCLUDE_DIR "${_root}/include")
          set(NCCL_LIBRARY "${_root}/${_libdir}/${_name}")
          set(NCCL_LIBRARY_DIR "${_root}/${_libdir}")
        endif()
      endforeach()
    endforeach()
  endif()
  if(NCCL_LIBRARY)
    break()
  endif()
endforeach()

if(NOT NCCL_LIBRARY)
  message(FATAL_ERROR "epcomm: NCCL >= 2.28 not found (looked in: ${_nccl_roots}). Set NCCL_HOME to a folder "
                      "with include/nccl.h, include/nccl_device.h and lib/libnccl.so[.2].")
endif()

file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _code_line REGEX "^#define NCCL_VERSION_CODE ")
string(REGEX REPLACE "^#define NCCL_VERSION_CODE +([0-9]+).*" "\\1" NCCL_VERSION_CODE "${_code_line}")
if(NOT NCCL_VERSION_CODE OR NCCL_VERSION_CODE LESS 22800)
  message(FATAL_ERROR "epcomm: NCCL headers in ${NCCL_INCLUDE_DIR} are version '${NCCL_VERSION_CODE}'; "
                      "epcomm needs >= 2.28 (22800) for the device API.")
endif()

# Ask the library itself for its version (ncclGetVersion needs no GPU).
set(_probe_dir "${CMAKE_BINARY_DIR}/nccl_version_probe")
file(WRITE "${_probe_dir}/probe.c"
     "#include <nccl.h>\n#include <stdio.h>\nint main(void){int v=0;if(ncclGetVersion(&v)!=ncclSuccess)return 1;"
     "printf(\"%d\",v);return 0;}\n")
try_run(_probe_run _probe_compile "${_probe_dir}/build" "${_probe_dir}/probe.c"
        CMAKE_FLAGS "-DINCLUDE_DIRECTORIES=${NCCL_INCLUDE_DIR};${CUDAToolkit_INCLUDE_DIRS}"
        LINK_LIBRARIES "${NCCL_LIBRARY}"
        COMPILE_OUTPUT_VARIABLE _probe_compile_out
        RUN_OUTPUT_VARIABLE _lib_version)
if(NOT _probe_compile)
  message(FATAL_ERROR "epcomm: could not build a program against ${NCCL_LIBRARY}:\n${_probe_compile_out}")
endif()
if(NOT _probe_run EQUAL 0)
  message(WARNING "epcomm: could not run the NCCL version probe; assuming ${NCCL_LIBRARY} matches its headers")
elseif(NOT _lib_version STREQUAL NCCL_VERSION_CODE)
  message(FATAL_ERROR "epcomm: NCCL headers (${NCCL_INCLUDE_DIR}) are version ${NCCL_VERSION_CODE} but the "
                      "library ${NCCL_LIBRARY} is version ${_lib_version}. They must match: set NCCL_HOME to one "
                      "installation holding both.")
endif()

message(STATUS "epcomm: NCCL ${NCCL_VERSION_CODE}: ${NCCL_INCLUDE_DIR}, ${NCCL_LIBRARY}")
add_library(epcomm::nccl SHARED IMPORTED)
set_target_properties(epcomm::nccl PROPERTIES IMPORTED_LOCATION "${NCCL_LIBRARY}" IMPORTED_NO_SONAME FALSE
                                              INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
