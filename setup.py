"""Package layout only (everything else is in pyproject.toml): qtk's packages, plus the top-level
``calibration/`` folder of the repository installed as ``qtk.calibration`` (the named texts: package data
that importlib.resources finds in a wheel and in an editable install). pyproject.toml alone cannot add a
package from outside ``qtk/`` to what ``packages.find`` discovers."""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["qtk*"]) + ["qtk.calibration"],
    package_dir={"qtk.calibration": "calibration"},
)
