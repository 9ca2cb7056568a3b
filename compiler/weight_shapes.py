"""A checkpoint's tensors against the shapes its config gives the model, checked before the (slow) build.

Quantized packing does not see the float shape, so a config that disagrees with its weights (3 KV heads
where the tensors hold 2) would otherwise compile into an artifact that cannot run."""

from __future__ import annotations

from tvm.relax.frontend import nn

from artifacts.errors import MlccError

# Model tensor name -> (its name in the source file, its shape as [rows, cols]).
SourceShapes = dict[str, tuple[str, tuple[int, ...]]]


def check_weight_shapes(net: nn.Module, shapes: SourceShapes, tie_embeddings: bool) -> None:
    """One-line MlccError naming the first tensor whose shape is not the one `net` (still unquantized) needs.

    Tensors the model has no parameter for are left to the conversion, which reports them."""
    needed = {name: tuple(int(d) for d in param.shape) for name, param in net.named_parameters()}
    for name, (source_name, shape) in shapes.items():
        if name not in needed or (tie_embeddings and name == "output.weight"):  # a tied head is not read
            continue
        if tuple(shape) != needed[name]:
            raise MlccError(
                f"tensor {source_name} has shape {list(shape)}, but the model config needs {list(needed[name])}; "
                "the config does not match the weights"
            )
