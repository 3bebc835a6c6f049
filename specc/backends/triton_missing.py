"""Stand-ins so a generated module imports where triton is not installed.

The kernels are then defined but never launched: the runtime refuses backend="triton" with a
message saying why, and backend="auto" uses NumPy on the CPU.
"""


class _Triton:
    @staticmethod
    def jit(fn=None, **options):
        return fn if fn is not None else (lambda f: f)

    @staticmethod
    def cdiv(a, b):
        return -(-a // b)


class _Language:
    constexpr = object


triton = _Triton()
tl = _Language()
