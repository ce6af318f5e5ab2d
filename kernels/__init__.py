"""Triton kernels, installed as ``fastmod.kernels``.

Importing this package imports triton; fastmod only does so when a Triton
backend is used.  Nothing here may evaluate ``triton.autotune`` or
``triton.testing`` at import: both fail on machines without a GPU.
"""
