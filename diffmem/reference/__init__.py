"""Pure-PyTorch reference implementations of diffmem's ops.

They follow the native ops' contracts exactly; the package falls back to them when the
extension is missing (and on devices whose native kernels are not enabled).
"""
