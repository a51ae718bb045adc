"""The vLLM method of a quantized LM head (``quantize --lm-head``): codes and scales in, a plain weight out.

A checkpoint quantized with ``--lm-head`` stores ``lm_head.weight_qweight`` (int8 [vocab,
hidden], or int4 packed two per byte as uint8 [vocab, hidden / 2]) and
``lm_head.weight_scales`` (fp32 [vocab] for int8, [vocab, hidden / group] for int4) instead
of ``lm_head.weight``, and lists ``lm_head`` in ``quantized_dense``. vLLM's
``ParallelLMHead`` would expect a ``weight``; :class:`QuantizedHeadMethod` instead creates
the two stored tensors as parameters shaped like this rank's vocab shard (vocab padding
included) and loads them with the layer's own vocab-parallel loader, which takes this
rank's rows and zero-fills the padding rows. After loading, the head is dequantized once
into a plain ``weight`` in the model's dtype (exactly ``codes * scales``, as every other
factorlm reader computes it) and the codes are released, so logits are one F.linear as
for an unquantized head: the saving is on disk, not in GPU memory.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn import Parameter
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from ...runtime.format import FormatError
from ...runtime.quant import check_quant_params, dequantize, qweight_dtype, qweight_shape, scales_shape

QWEIGHT, SCALES = "weight_qweight", "weight_scales"

_DEQUANT_ROWS = 8192  # rows dequantized at a time: bounds the fp32 temporaries of a large vocab


class QuantizedHeadMethod(QuantizeMethodBase):
    """Method of a ``ParallelLMHead`` (or a vocab-parallel embedding used as the head) stored as int8/int4.

    ``bits`` and ``group_size`` are the checkpoint's scheme (``group_size`` None for int8).
    """

    def __init__(self, bits: int, group_size: int | None) -> None:
        self.bits = bits
        self.group_size = group_size if bits == 4 else None

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        """Codes and scales of this rank's vocab rows (padding rows included), sharded on dim 0.

        The layer's vocab-parallel ``weight_loader`` (in ``extra_weight_attrs``) narrows the
        full-vocab tensors to this rank's rows, so both parameters carry ``output_dim=0``.
        """
        prefix = getattr(layer, "prefix", "lm_head")
        rows, hidden = sum(output_partition_sizes), input_size_per_partition
        check_quant_params(self.bits, self.group_size, hidden, f"{prefix} (quantized LM head)")
        vocab_loader = extra_weight_attrs.pop("weight_loader", None)
        if vocab_loader is None:
            raise FormatError(f"{prefix}: a quantized LM head needs the vocab-parallel layer's weight loader")
        layer.factorlm_head_dtype = params_dtype
        for name, shape, dtype in ((QWEIGHT, qweight_shape(self.bits, rows, hidden), qweight_dtype(self.bits)),
                                   (SCALES, scales_shape(self.bits, self.group_size, rows, hidden), torch.float32)):
            param = Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, {"input_dim": 1, "output_dim": 0,
                                     "weight_loader": _checked_loader(prefix, name, vocab_loader)})
            set_weight_attrs(param, extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Replace the codes and scales by the dequantized ``weight`` [rows, hidden] in the model's dtype."""
        qweight, scales = getattr(layer, QWEIGHT).data, getattr(layer, SCALES).data
        rows = qweight.shape[0]
        hidden = qweight.shape[1] * (2 if self.bits == 4 else 1)
        weight = torch.empty(rows, hidden, dtype=layer.factorlm_head_dtype, device=qweight.device)
        for start in range(0, rows, _DEQUANT_ROWS):
            end = min(start + _DEQUANT_ROWS, rows)
            weight[start:end] = dequantize(qweight[start:end], scales[start:end], self.bits, self.group_size,
                                           weight.dtype)
        delattr(layer, QWEIGHT)
        delattr(layer, SCALES)
        layer.weight = Parameter(weight, requires_grad=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of this rank's vocab shard: x Wᵀ (+ bias); the logits processor gathers the shards."""
        return F.linear(x, layer.weight, bias)

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        """Row lookup in the dequantized table (for a vocab-parallel embedding that serves as the head)."""
        return F.embedding(input_, layer.weight)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module) -> torch.nn.Module:
        """Refuse: a quantized head has codes of its own (``quantize --lm-head`` unties it in config.json)."""
        raise FormatError(f"{getattr(layer, 'prefix', 'lm_head')}: the LM head is quantized, so it cannot be tied "
                          "to the input embeddings; config.json should say tie_word_embeddings: false")


def _checked_loader(prefix: str, name: str, vocab_loader: Any):
    """The vocab-parallel loader, after checking the stored tensor's dtype and non-vocab dims (factorlm's message)."""

    def weight_loader(param: Parameter, loaded_weight: torch.Tensor, *args: Any) -> None:
        if args and args[0] is not None:
            raise FormatError(f"{prefix}.{name}: unexpected shard id {args[0]!r} for the LM head")
        want_dtype = param.dtype
        if name == QWEIGHT and loaded_weight.dtype != want_dtype:
            raise FormatError(f"{prefix}.{name}: stored as {loaded_weight.dtype}, expected {want_dtype} "
                              "for this checkpoint's bits")
        if loaded_weight.dim() != param.dim() or tuple(loaded_weight.shape[1:]) != tuple(param.shape[1:]):
            raise FormatError(f"{prefix}.{name}: stored shape {tuple(loaded_weight.shape)} does not fit "
                              f"[vocab{''.join(f', {d}' for d in param.shape[1:])}] (this checkpoint's bits/group size)")
        vocab_loader(param, loaded_weight)

    return weight_loader
