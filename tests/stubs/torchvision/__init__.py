"""TEST STAND-IN for torchvision (see tests/stubs/README.md): importable, unusable.

Any ``torchvision.<sub>`` module resolves to a stand-in whose names are
placeholders: attribute access works (import-time defaults such as
``InterpolationMode.BICUBIC``), calling or instantiating raises.
"""

import importlib.abc
import importlib.machinery
import sys
import types

STAND_IN = True
__version__ = "0.0.0+stand-in"


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls

    def __call__(cls, *args, **kwargs):
        raise RuntimeError("torchvision is a test stand-in here; multimodal preprocessing is not available")


class Unusable(metaclass=_Meta):
    pass


def _module_getattr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return Unusable


__getattr__ = _module_getattr


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__getattr__ = _module_getattr
        mod.__path__ = []
        mod.STAND_IN = True
        return mod

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
        return None


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
