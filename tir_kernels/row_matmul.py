"""A dense matmul's kernel body, kept apart from the kernel that runs it so that two kernels share it.

A dense layer's kernel is the body alone over all its rows. A mixture's grouped expert kernel
(tir_kernels/experts.py) runs the very same body once per expert, on views of that expert's weight rows and of the
token rows routed to it: experts get the dense layers' 8-bit-activation integer kernels, with their speed
and their numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from tvm import tirx
from tvm.script import tirx as T


@dataclass(frozen=True)
class RowMatmul:
    """y [n, n_out] = x [n, n_in] @ W^T for any row count n, W packed into a uint8 array of `data_shape`.

    `body` is a TVMScript macro `(x, data, y, n, capacity)` that quantizes x's n rows into scratch buffers of
    `capacity` >= n rows and writes every y[t, o]. (The grouped kernel's scratch has all its rows' capacity: a
    buffer sized by an expert's row count, a value loaded inside the kernel, cannot be allocated.)"""

    body: Any
    n_in: int
    n_out: int
    data_shape: tuple[int, int]

    @functools.cached_property
    def kernel(self) -> tirx.PrimFunc:
        """The dense kernel, parsed once per body (every layer of a shape shares it)."""
        body, n_in, n_out, data_shape = self.body, self.n_in, self.n_out, self.data_shape

        @T.prim_func(private=True, s_tir=True)
        def kernel(var_x: T.handle, data: T.Buffer(data_shape, "uint8"), var_y: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int64()
            x = T.match_buffer(var_x, (n, n_in), "float32")
            y = T.match_buffer(var_y, (n, n_out), "float32")
            body(x, data, y, n, n)

        return kernel
