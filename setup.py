"""Only what pyproject.toml cannot say: where the packages come from.

benchmarks/ stays at the top of the repository (`python -m benchmarks` in a checkout), but a wheel
must not put a generic top-level `benchmarks` package into site-packages: it installs as
lazygraph.benchmarks, run by the `lazygraph-bench` script. pyproject's packages.find cannot map a
folder to another package name, so the package list is built here.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["lazygraph", "lazygraph.*", "gpt2", "gpt2.*"]) + ["lazygraph.benchmarks"],
    package_dir={"lazygraph.benchmarks": "benchmarks"},
)
