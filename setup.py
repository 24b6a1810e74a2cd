"""The one compiled module (the prefix index's hot loops); everything else is in pyproject.toml.

``optional=True``: where no C compiler is found the install still succeeds and the Python
versions run (pd_runtime/kv_events/native.py says which is in use).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pd_runtime.kv_events._native",
            sources=["pd_runtime/kv_events/_native.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wno-unused-label"],
            optional=True,
        )
    ]
)
