"""Version guards for the frameworks whose internals memit-vllm relies on (see the two compat modules).

An untested release may change an internal silently, so it is refused with one line that names the
installed and the tested versions, unless the operator opts in with MEMIT_VLLM_ALLOW_UNTESTED=1.
"""

from __future__ import annotations

import os

ALLOW_UNTESTED_ENV = "MEMIT_VLLM_ALLOW_UNTESTED"


def untested(name: str, installed: str | None, tested: str, install: str) -> str | None:
    """Why `installed` (a version of `name`) may not be used, in one line, or None. `tested` is a
    specifier (">=0.32,<0.33"); `install` what to pip install to get a tested version."""
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return None
    from packaging.specifiers import SpecifierSet

    if installed is None:
        return f"{name} is not installed: pip install '{install}'"
    if SpecifierSet(tested).contains(installed, prereleases=True):
        return None
    return (f"{name} {installed} is installed, but memit-vllm was tested with {name}{tested} (it relies on "
            f"internals that change between releases): pip install '{install}', or set {ALLOW_UNTESTED_ENV}=1 "
            "to run anyway")
