"""Maps the top-level kernels/ folder to the `jaxlab.kernels` package (metadata lives in pyproject.toml).

A bare `kernels` package would collide with an existing PyPI name, so kernels/ is installed under jaxlab.
"""

from setuptools import find_packages, setup

packages = ["jaxlab", *(f"jaxlab.{p}" for p in find_packages("jaxlab"))]
packages += ["jaxlab.kernels", *(f"jaxlab.kernels.{p}" for p in find_packages("kernels"))]
setup(packages=packages, package_dir={"jaxlab": "jaxlab", "jaxlab.kernels": "kernels"})
