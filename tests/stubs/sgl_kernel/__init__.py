"""TEST STAND-IN for sgl_kernel (see tests/stubs/README.md): records and refuses every call."""

import os

STAND_IN = True


def _note_import():
    path = os.environ.get("TTS_SGL_KERNEL_CALLS")
    if path:
        with open(path + ".imports", "a") as f:
            f.write(f"{os.getpid()}\n")


def _record(name):
    path = os.environ.get("TTS_SGL_KERNEL_CALLS")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {name}\n")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def stand_in(*args, **kwargs):
        _record(name)
        raise RuntimeError(f"sgl_kernel.{name} called: this test stand-in implements nothing")

    stand_in.__name__ = name
    return stand_in


_note_import()
