"""Test-only stand-in for SGLang's CUDA-only ``sgl_kernel`` (it cannot import without a GPU).

SGLang's CPU path imports it unconditionally. Every attribute is a function that raises when
called, so a test that reaches a real kernel fails loudly instead of computing garbage.
Never installed for users: the tests put this folder first on ``PYTHONPATH``.
"""

__version__ = "0.0.0+standin"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} was called: the CPU test stand-in has no kernels")

    _missing.__name__ = name
    return _missing
