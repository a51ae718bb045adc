"""FactoredLinear: a linear layer stored as two factors, y = U (V x) + b.

A dense [out, in] weight costs out*in parameters and as many bytes read per token; the
factored layer costs r*(out+in). Below the break-even rank r* = out*in/(out+in) it is
smaller and, for memory-bound decoding, faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .format import FactorlmError


def truncated_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``weight`` (Eckart-Young), split as U√Σ and √Σ Vᵀ.

    Splitting √Σ across both factors keeps their scales balanced, which matters for
    fp16/bf16 storage and for later training of the factors.
    """
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise FactorlmError(
            f"rank {rank} is out of range for a [{out_features}, {in_features}] weight "
            f"(need 1 <= rank <= {min(out_features, in_features)})"
        )
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


class FactoredLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding ``weight_u`` [out, r] and ``weight_v`` [r, in]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise FactorlmError(f"rank must be >= 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        kw = {"device": device, "dtype": dtype}
        self.weight_u = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.weight_v = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_v), self.weight_u, self.bias)

    @classmethod
    def from_factors(
        cls, weight_u: torch.Tensor, weight_v: torch.Tensor, bias: torch.Tensor | None = None
    ) -> "FactoredLinear":
        """Wrap given factors (no copy of their storage beyond Parameter creation)."""
        out_features, rank = weight_u.shape
        rank_v, in_features = weight_v.shape
        if rank != rank_v:
            raise FactorlmError(f"factor ranks disagree: weight_u {tuple(weight_u.shape)} vs weight_v {tuple(weight_v.shape)}")
        if bias is not None and bias.shape != (out_features,):
            raise FactorlmError(f"bias shape {tuple(bias.shape)} does not match out_features {out_features}")
        layer = cls(in_features, out_features, rank, bias=bias is not None, device="meta", dtype=weight_u.dtype)
        layer.weight_u = nn.Parameter(weight_u.detach())
        layer.weight_v = nn.Parameter(weight_v.detach())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "FactoredLinear":
        """Plain truncated-SVD factorization of an ``nn.Linear``."""
        u, v = truncated_svd_factors(linear.weight, rank)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls.from_factors(u, v, bias)

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` with W = U V (for export paths that want it)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight_u.device, dtype=self.weight_u.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.weight_u @ self.weight_v)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def factor_parameters(self) -> list[nn.Parameter]:
        """U, V and the bias if any: what a factored layer stores whether or not it has a corrector."""
        return [self.weight_u, self.weight_v] + ([self.bias] if self.bias is not None else [])

    def weight_params(self) -> int:
        """Stored weight parameters (bias excluded); what budgets count."""
        return self.weight_u.numel() + self.weight_v.numel()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def fold_corrector(u: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U' = [U | B], V' = [V ; A]: U'V' = UV + BA exactly (rank r + c)."""
    if a.shape[1] != v.shape[1] or b.shape[0] != u.shape[0] or a.shape[0] != b.shape[1]:
        raise FactorlmError(
            f"corrector shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit factors U {tuple(u.shape)}, V {tuple(v.shape)}"
        )
    return torch.cat([u, b], dim=1), torch.cat([v, a], dim=0)


class CorrectedLinear(FactoredLinear):
    """A factored layer with its CALR corrector kept apart: y = U(Vx) + B(Ax) + b.

    ``corrector_a`` [c, in] and ``corrector_b`` [out, c] sit beside ``weight_u``/``weight_v``
    under the same module name, which is how a checkpoint saved with separate correctors
    stores them (for further training). :meth:`fold` gives the exact plain factored layer of
    rank r + c that inference uses.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, corrector_rank: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, rank, bias=bias, device=device, dtype=dtype)
        if corrector_rank < 1:
            raise FactorlmError(f"corrector rank must be >= 1, got {corrector_rank}")
        kw = {"device": device, "dtype": dtype}
        self.corrector_a = nn.Parameter(torch.empty(corrector_rank, in_features, **kw))
        self.corrector_b = nn.Parameter(torch.empty(out_features, corrector_rank, **kw))

    @classmethod
    def from_base(cls, base: FactoredLinear, a: torch.Tensor, b: torch.Tensor) -> "CorrectedLinear":
        """Attach corrector (A, B) to ``base``, sharing its factor Parameters (no copy of U, V)."""
        u, v = base.weight_u, base.weight_v
        if a.shape[1] != v.shape[1] or b.shape[0] != u.shape[0] or a.shape[0] != b.shape[1]:
            raise FactorlmError(f"corrector shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit factors "
                                f"U {tuple(u.shape)}, V {tuple(v.shape)}")
        layer = cls(base.in_features, base.out_features, base.rank, a.shape[0], bias=base.bias is not None,
                    device="meta", dtype=u.dtype)
        layer.weight_u, layer.weight_v, layer.bias = base.weight_u, base.weight_v, base.bias
        layer.corrector_a = nn.Parameter(a.detach().clone().to(u.device))
        layer.corrector_b = nn.Parameter(b.detach().clone().to(u.device))
        return layer

    @property
    def corrector_rank(self) -> int:
        return self.corrector_a.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.linear(F.linear(x, self.corrector_a), self.corrector_b)

    def weight_params(self) -> int:
        return super().weight_params() + self.corrector_a.numel() + self.corrector_b.numel()

    def fold(self) -> FactoredLinear:
        """The equivalent FactoredLinear of rank r + c (exact up to float rounding)."""
        u, v = fold_corrector(self.weight_u.detach(), self.weight_v.detach(),
                              self.corrector_a.detach(), self.corrector_b.detach())
        bias = self.bias.detach() if self.bias is not None else None
        return FactoredLinear.from_factors(u.contiguous(), v.contiguous(), bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", corrector_rank={self.corrector_rank}"


def break_even_rank(out_features: int, in_features: int) -> float:
    """Rank at which factoring saves nothing: r* = out*in / (out+in)."""
    return out_features * in_features / (out_features + in_features)


def factored_params(out_features: int, in_features: int, rank: int) -> int:
    """Parameter count of a rank-``rank`` factorization (bias excluded)."""
    return rank * (out_features + in_features)
