import pytest
import torch
from torch import nn

from factorlm.compressor.correctors import (
    attach_corrector,
    corrector_ranks,
    damped_gram,
    distill,
    eora_corrector,
    fold_corrector,
    functional_residual,
    residual_energy,
    train_layer,
)
from factorlm.runtime.arch import compressible_linears
from factorlm.runtime.checkpoint import factorize_model, load_model, save_factored
from factorlm.runtime.factored_linear import FactoredLinear
from factorlm.runtime.format import FactorlmError
from factorlm.testing import make_tiny_model


def planted(seed=0, m=48, n=40, N=400):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    # correlated activations: the whitened objective differs from the plain one
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    x = torch.randn(N, n, generator=g, dtype=torch.float64) @ mix
    return w, x


def test_folding_is_exact():
    torch.manual_seed(0)
    base = FactoredLinear.from_linear(nn.Linear(40, 48), 8)
    layer = attach_corrector(base, torch.randn(4, 40), torch.randn(48, 4))
    x = torch.randn(5, 40)
    folded = layer.fold()
    assert folded.rank == 12
    torch.testing.assert_close(folded(x), layer(x), atol=1e-5, rtol=1e-5)


def test_fold_shape_errors():
    with pytest.raises(FactorlmError, match="corrector shapes"):
        fold_corrector(torch.zeros(8, 2), torch.zeros(2, 6), torch.zeros(3, 5), torch.zeros(8, 3))


def test_eora_is_optimal_for_the_weighted_objective():
    w, x = planted()
    base = FactoredLinear.from_linear(nn.Linear(40, 48).double().requires_grad_(False), 8)
    base.weight_u.data, base.weight_v.data = [t.double() for t in (torch.linalg.svd(w)[0][:, :8] * torch.linalg.svdvals(w)[:8], torch.linalg.svd(w)[2][:8])]
    r = w - base.weight_u @ base.weight_v
    gram = x.T @ x
    a, b = eora_corrector(r, gram, 6)
    err_eora = torch.linalg.norm((r - b @ a) @ x.T)
    # any other rank-6 correction, e.g. the plain (unweighted) SVD of R, is no better
    u, s, vh = torch.linalg.svd(r)
    err_plain = torch.linalg.norm((r - (u[:, :6] * s[:6]) @ vh[:6]) @ x.T)
    assert err_eora <= err_plain + 1e-9
    energy = residual_energy(r, gram)
    torch.testing.assert_close(err_eora**2, energy[6:].sum(), rtol=1e-5, atol=0)


def test_functional_residual_is_the_weight_residual_on_a_shared_stream():
    w, _ = planted()
    approx = w.clone()
    approx[:, :10] *= 0.5  # some U V
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 40, generator=g, dtype=torch.float64)
    r, gram = functional_residual(x, x @ (w - approx).T, damp=0.0)
    torch.testing.assert_close(r, w - approx)
    torch.testing.assert_close(gram, x.T @ x)
    damped, _ = functional_residual(x, x @ (w - approx).T)  # the ridge shrinks, never grows, the residual
    assert float(damped.norm()) < float((w - approx).norm())


def test_functional_residual_with_a_shared_gram_matches_its_own():
    """Layers that read one input (q/k/v, gate/up) share one damped Gram; the residual is unchanged."""
    w, _ = planted()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64)
    err = x @ (0.1 * w).T
    own, gram = functional_residual(x, err)
    torch.testing.assert_close(gram, damped_gram(x))
    shared, same = functional_residual(x, err, gram=gram)
    assert same is gram
    torch.testing.assert_close(shared, own)
    with pytest.raises(FactorlmError, match="Gram"):
        functional_residual(x, err, gram=gram[:10, :10])


def test_functional_closed_form_keeps_compensation_the_weight_residual_undoes():
    """Factors fitted to a shifted (student) stream: W - UV is not what the output lost."""
    w, x_teacher = planted(seed=1)
    g = torch.Generator().manual_seed(2)
    drift = torch.randn(40, 40, generator=g, dtype=torch.float64) * 0.05
    x_student = x_teacher + x_teacher @ drift  # upstream error of the compressed model
    target = x_teacher @ w.T
    # compensated rank-8 factors: the best rank-8 map from the student rows to the dense outputs
    full = torch.linalg.lstsq(x_student, target).solution.T  # [out, in]
    a8, b8 = eora_corrector(full, x_student.T @ x_student, 8)
    uv = b8 @ a8
    error = target - x_student @ uv.T
    func_r, gram = functional_residual(x_student, error, damp=0.0)
    weight_r = w - uv
    for c in (2, 4, 8):
        after = {}
        for name, r in (("weight", weight_r), ("functional", func_r)):
            a, b = eora_corrector(r, gram, c)
            after[name] = float(torch.linalg.norm(error - x_student @ (b @ a).T))
        assert after["functional"] < float(torch.linalg.norm(error))  # never worse than no corrector
        assert after["functional"] < after["weight"]
    # and its energy says exactly what a rank-c correction removes
    a, b = eora_corrector(func_r, gram, 4)
    removed = float(torch.linalg.norm(error)) ** 2 - float(torch.linalg.norm(error - x_student @ (b @ a).T)) ** 2
    assert removed == pytest.approx(float(residual_energy(func_r, gram)[:4].sum()), rel=1e-6)


def test_training_lowers_functional_residual():
    torch.manual_seed(0)
    w, x = planted()
    w, x = w.float(), x.float()
    dense = nn.Linear(40, 48, bias=False)
    dense.weight.data = w
    base = FactoredLinear.from_linear(dense, 8)
    layer = attach_corrector(base, torch.zeros(4, 40), torch.randn(48, 4) * 0.01)
    targets = dense(x).detach()
    losses = train_layer(layer, x, targets, steps=150, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0]


def test_corrector_ranks_follow_residual_energy_and_budget():
    energies = {"big": torch.linspace(10, 1, 64), "small": torch.linspace(1, 0.1, 64) * 0.001,
                "flat": torch.ones(64)}
    costs = {n: 100 for n in energies}
    output_energy = {n: 1000.0 for n in energies}  # same dense output energy: "small" has little to fix
    ranks = corrector_ranks(energies, output_energy, costs, budget=8 * 100 * 5, multiple=8)
    assert sum(ranks.values()) * 100 <= 8 * 100 * 5
    assert ranks["small"] <= min(ranks["big"], ranks["flat"])


def test_distillation_reduces_kl_and_folded_checkpoint_loads(tmp_path):
    teacher, tok = make_tiny_model("llama")
    student, _ = make_tiny_model("llama")
    ranks = {n: 8 for n in compressible_linears(student)}
    factorize_model(student, ranks)
    wrapped = {}
    for name, mod in compressible_linears(student).items():
        parent, _, child = name.rpartition(".")
        c = attach_corrector(mod, torch.zeros(4, mod.in_features), torch.zeros(mod.out_features, 4))
        setattr(student.get_submodule(parent), child, c)
        wrapped[name] = c
    for p in student.parameters():
        p.requires_grad_(False)
    params = []
    for c in wrapped.values():
        c.corrector_a.data.normal_(0, 0.01)
        params += [c.corrector_a, c.corrector_b]
        c.corrector_a.requires_grad_(True)
        c.corrector_b.requires_grad_(True)
    batches = [tok("The quick brown fox jumps over the lazy dog. " * 2, return_tensors="pt").input_ids]
    with torch.no_grad():
        teacher_lp = [teacher(input_ids=b).logits.log_softmax(-1) for b in batches]
    losses = distill(student, batches, teacher_lp, params, steps=25, lr=3e-3)
    assert losses[-1] < losses[0]
    before = student(batches[0]).logits.detach()
    for name, c in wrapped.items():
        parent, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent), child, c.fold())
    torch.testing.assert_close(student(batches[0]).logits, before, atol=1e-4, rtol=1e-4)
    save_factored(student, tmp_path / "ck", tokenizer=tok)
    loaded = load_model(tmp_path / "ck")
    assert loaded.get_submodule(next(iter(ranks))).rank == 12
    torch.testing.assert_close(loaded(batches[0]).logits, before, atol=1e-4, rtol=1e-4)


def test_save_refuses_a_rank_past_full_and_writes_nothing(tmp_path):
    model, tok = make_tiny_model("llama")
    name = "model.layers.0.self_attn.k_proj"
    dense = model.get_submodule(name)
    over = FactoredLinear(dense.in_features, dense.out_features, min(dense.in_features, dense.out_features) + 8)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, over)
    with pytest.raises(FactorlmError, match="k_proj.*exceeds min"):
        save_factored(model, tmp_path / "out", tokenizer=tok)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
