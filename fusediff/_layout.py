"""Where ``fusediff.kernels``, ``fusediff.fxpasses`` and ``fusediff.lowering`` come from.

The repository keeps the three folders at its top level (``kernels/``, ``fxpasses/``,
``lowering/``); an installed wheel has them inside this package (setuptools ``package-dir``).
The folders carry **no** ``__init__.py``: whenever a checkout's root is on ``sys.path``
(``python -c`` or ``python -m`` run there, pytest's rootdir insertion), a folder with one would
be a regular top-level package and shadow other libraries' ``kernels`` (Hugging Face's, which
``transformers`` imports) or ``lowering``; without one it is a namespace portion, and a regular
package elsewhere on the path wins. They are imported only as ``fusediff.<name>`` namespace
subpackages.

In a wheel install the subpackages sit in this package's folder and the ordinary import system
finds them. In a checkout (editable install, or the checkout on ``PYTHONPATH``) they sit beside
it: :func:`mount` adds a finder that resolves exactly these three names there. (setuptools'
editable finder does not resolve a mapped package without ``__init__.py``.)
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

SUBPACKAGES = ("kernels", "fxpasses", "lowering")


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Resolves ``<package>.kernels|fxpasses|lowering`` to the folders at a checkout's root."""

    def __init__(self, package: str, root: Path):
        self.package = package
        self.root = str(root)

    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        if parent != self.package or name not in SUBPACKAGES:
            return None
        # PathFinder on the root alone: a namespace spec for root/<name> (submodules then import
        # from its __path__ like any package's).
        return importlib.machinery.PathFinder.find_spec(fullname, [self.root])

    def __eq__(self, other):
        return isinstance(other, _CheckoutFinder) and (other.package, other.root) == (self.package, self.root)

    def __hash__(self):
        return hash((self.package, self.root))


def mount(package: str, package_dir: str) -> str:
    """Make ``<package>.kernels|fxpasses|lowering`` importable; returns ``"wheel"`` or ``"checkout"``.

    Args:
        package: the package's name (``fusediff``).
        package_dir: the folder of its ``__init__.py``.
    """
    here = Path(package_dir)
    if all((here / s).is_dir() for s in SUBPACKAGES):
        return "wheel"
    root = here.parent
    missing = [s for s in SUBPACKAGES if not (root / s).is_dir()]
    if missing:
        raise ImportError(f"{package}: subpackage folders {missing} found neither in {here} (an installed wheel) "
                          f"nor beside it in {root} (a checkout); reinstall fusediff")
    finder = _CheckoutFinder(package, root)
    if finder not in sys.meta_path:
        sys.meta_path.append(finder)
    return "checkout"
