"""Only the compiled packet loop is declared here (setuptools' stable API for C
extensions); everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and the server
runs its Python loop (``guardntp/fastlane.py`` says which one is in use).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "guardntp._fastlane", ["guardntp/_fastlane.c"], optional=True,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"])])
