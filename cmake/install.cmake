# cmake --install: the header, the library, a CMake package (find_package(epcomm)) and a pkg-config file.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS epcomm EXPORT epcommTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(FILES ${PROJECT_SOURCE_DIR}/include/epcomm.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT epcommTargets NAMESPACE epcomm:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/epcomm)

file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/epcommConfig.cmake.in
     "@PACKAGE_INIT@\ninclude(\"\${CMAKE_CURRENT_LIST_DIR}/epcommTargets.cmake\")\n")
configure_package_config_file(${CMAKE_CURRENT_BINARY_DIR}/epcommConfig.cmake.in
                              ${CMAKE_CURRENT_BINARY_DIR}/epcommConfig.cmake
                              INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/epcomm)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/epcommConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/epcommConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/epcommConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/epcomm)

configure_file(${PROJECT_SOURCE_DIR}/cmake/epcomm.pc.in ${CMAKE_CURRENT_BINARY_DIR}/epcomm.pc @ONLY)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/epcomm.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
