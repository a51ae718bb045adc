"""Healing at scale: top-k teacher cache, resume, and 2-process gloo DDP against 1 process."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from factorlm.compressor.finetune import FinetuneConfig, finetune, finetune_checkpoint, state_dir_for
from factorlm.runtime.arch import compressible_linears
from factorlm.runtime.checkpoint import factorize_model, load_factored, save_factored
from factorlm.runtime.format import FactorlmError
from factorlm.testing import make_tiny_model, save_tiny_dense

TEXT = ("Low rank compression keeps the directions that carry the most energy of the activations. "
        "Serving engines batch requests so that the weights are read once for many sequences. ") * 60


@pytest.fixture()
def pair(tmp_path):
    dense = save_tiny_dense(tmp_path / "dense", "llama")
    model, tok = make_tiny_model("llama")
    factorize_model(model, {n: 6 for n in compressible_linears(model)})
    factored = save_factored(model, tmp_path / "factored", tokenizer=tok)
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    return dense, factored, text


def _models():
    teacher, _ = make_tiny_model("llama")
    student, _ = make_tiny_model("llama")
    factorize_model(student, {n: 6 for n in compressible_linears(student)})
    return student, teacher


def test_cached_full_vocab_teacher_gives_the_on_the_fly_loss(tmp_path):
    torch.manual_seed(0)
    windows = torch.randint(0, 200, (8, 16))
    held = torch.randint(0, 200, (2, 16))
    reports = {}
    for name, k in (("fly", None), ("full", 10**6), ("top8", 8)):
        student, teacher = _models()
        cfg = FinetuneConfig(steps=4, lr=3e-3, samples=8, seq_len=16, held_out=2, batch_size=2,
                             top_k=k, cache_dir=str(tmp_path / "cache"))
        reports[name] = finetune(student, teacher, windows, held, cfg, progress=False)
    assert reports["full"]["loss"] == pytest.approx(reports["fly"]["loss"], rel=1e-5, abs=1e-7)
    # top-k with a tail bucket merges categories: a lower bound of the full KL at the first step
    assert reports["top8"]["loss"][0] <= reports["fly"]["loss"][0] + 1e-6
    assert any(p.name.endswith(".safetensors") for p in (tmp_path / "cache").iterdir())


def test_resume_after_a_stop_is_bit_exact(pair, tmp_path):
    dense, factored, text = pair
    cfg = FinetuneConfig(steps=6, lr=3e-3, samples=12, seq_len=16, held_out=2, batch_size=2, save_every=2)
    full, rep_full = finetune_checkpoint(factored, dense, tmp_path / "full", str(text), cfg, progress=False)
    out = tmp_path / "part"
    state, _ = finetune_checkpoint(factored, dense, out, str(text), cfg, progress=False, stop_after=3)
    assert state == state_dir_for(out) and not out.exists()
    assert json.loads((state / "trainer_state.json").read_text())["step"] == 3
    with pytest.raises(FactorlmError, match="lr"):
        finetune_checkpoint(factored, dense, out, str(text), FinetuneConfig(**{**cfg.__dict__, "lr": 1e-3}),
                            progress=False, resume=True)
    _, rep = finetune_checkpoint(factored, dense, out, str(text), cfg, progress=False, resume=True)
    assert rep["loss"] == rep_full["loss"]
    a, b = load_factored(full).state_dict(), load_factored(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not state.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    factored, dense, out, text, cfg = args
    try:
        finetune_checkpoint(factored, dense, out, text, cfg, progress=False)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(pair, tmp_path):
    dense, factored, text = pair
    one = FinetuneConfig(steps=5, lr=3e-3, samples=20, seq_len=16, held_out=2, batch_size=4)
    _, rep1 = finetune_checkpoint(factored, dense, tmp_path / "one", str(text), one, progress=False)
    two = FinetuneConfig(steps=5, lr=3e-3, samples=20, seq_len=16, held_out=2, batch_size=1, grad_accum=2)
    mp.spawn(_worker, args=(2, _free_port(), (factored, dense, tmp_path / "two", str(text), two)), nprocs=2)
    rep2 = json.loads((tmp_path / "two" / "factorlm_finetune.json").read_text())
    assert rep2["world_size"] == 2 and rep1["world_size"] == 1 and rep2["global_batch"] == 4
    assert rep2["loss"] == pytest.approx(rep1["loss"], rel=1e-4)
    a, b = load_factored(tmp_path / "one").state_dict(), load_factored(tmp_path / "two").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_topk_kl_tail_bucket_is_the_merged_category_kl():
    """Planted teacher/student: the k + 1-category KL equals the full KL at k = vocab, bounds it below
    otherwise, and matches the KL computed by hand over (top-k tokens, merged tail)."""
    from factorlm.compressor.correctors import kl_to_teacher
    from factorlm.compressor.teacher_cache import topk_kl

    torch.manual_seed(0)
    vocab = 12
    t_logits, s_logits = torch.randn(2, 3, vocab) * 2, torch.randn(2, 3, vocab) * 2
    t_logp = t_logits.log_softmax(-1)
    full = float(kl_to_teacher(s_logits, t_logp))
    for k in (1, 3, 6, vocab - 1, vocab):
        vals, idx = t_logp.topk(k, dim=-1)
        got = float(topk_kl(s_logits, vals, idx))
        p, q = t_logp.exp(), s_logits.softmax(-1)
        keep = torch.zeros_like(p, dtype=torch.bool).scatter(-1, idx, True)
        pk = torch.cat([p.gather(-1, idx), (p * ~keep).sum(-1, keepdim=True)], -1)
        qk = torch.cat([q.gather(-1, idx), (q * ~keep).sum(-1, keepdim=True)], -1)
        by_hand = float(torch.where(pk > 0, pk * (pk.log() - qk.log()), torch.zeros_like(pk)).sum(-1).mean())
        assert got == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
        assert 0.0 <= got <= full + 1e-6
        if k >= vocab - 1:  # a tail of one token (or none) merges nothing
            assert got == pytest.approx(full, rel=1e-5, abs=1e-6)
        else:
            assert got < full
    # a student that drops the tail pays for it: zero tail mass in the student gives a large loss
    vals, idx = t_logp.topk(3, dim=-1)
    starved = torch.full_like(s_logits, -30.0).scatter(-1, idx, vals)
    assert float(topk_kl(starved, vals, idx)) > 1.0
    grad_in = s_logits.clone().requires_grad_(True)
    topk_kl(grad_in, vals, idx).backward()
    assert torch.isfinite(grad_in.grad).all()


def _fsdp_worker(rank, world, port, args):
    """One FSDP rank: a run stopped after step 3 (state saved), a snapshot of that state, then the resume."""
    import shutil

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import factorlm.compressor.finetune as ft

    factored, dense, out, text, cfg, snapshot = args
    shard, calls = ft.shard_model, []

    def recording_shard(model, env):  # record how much of the model this rank holds once sharded
        shard(model, env)
        calls.append(1)
        held = sum(p.to_local().numel() for p in model.parameters())
        (snapshot.parent / f"held-{rank}-{len(calls)}.json").write_text(
            json.dumps([held, sum(p.numel() for p in model.parameters())]))
        return model

    ft.shard_model = recording_shard
    try:
        state, _ = finetune_checkpoint(factored, dense, out, text, cfg, progress=False, stop_after=3)
        if rank == 0:
            shutil.copytree(state, snapshot)
        torch.distributed.barrier()
        finetune_checkpoint(factored, dense, out, text, cfg, progress=False, resume=True)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_fsdp_processes_equal_one_process_and_checkpoint_full_state(pair, tmp_path):
    """FSDP2 over 2 gloo ranks: same losses as 1 process at the same global batch, a training state
    gathered to the full tensors of the 1-process state, and the same output checkpoint after resume."""
    from safetensors.torch import load_file

    from factorlm.compressor.heal_loop import STATE_TENSORS

    dense, factored, text = pair
    one = FinetuneConfig(steps=5, lr=3e-3, samples=20, seq_len=16, held_out=2, batch_size=4, save_every=2)
    finetune_checkpoint(factored, dense, tmp_path / "one", str(text), one, progress=False, stop_after=3)
    ref_state = load_file(str(state_dir_for(tmp_path / "one") / STATE_TENSORS))
    _, rep1 = finetune_checkpoint(factored, dense, tmp_path / "one", str(text), one, progress=False, resume=True)
    two = FinetuneConfig(steps=5, lr=3e-3, samples=20, seq_len=16, held_out=2, batch_size=1, grad_accum=2,
                         save_every=2, parallel="fsdp")
    snap = tmp_path / "snapshot"
    mp.spawn(_fsdp_worker, args=(2, _free_port(), (factored, dense, tmp_path / "two", str(text), two, snap)), nprocs=2)
    rep2 = json.loads((tmp_path / "two" / "factorlm_finetune.json").read_text())
    held = [json.loads(f.read_text()) for f in tmp_path.glob("held-*.json")]
    assert len(held) == 8  # 2 ranks x (student, teacher) x (stopped run, resumed run)
    assert all(mine <= 0.55 * whole for mine, whole in held)  # each rank holds about half of each model
    assert (rep2["world_size"], rep2["parallel"], rep2["global_batch"]) == (2, "fsdp", 4)
    assert rep1["parallel"] == "single"
    assert rep2["loss"] == pytest.approx(rep1["loss"], rel=1e-4)
    state = load_file(str(snap / STATE_TENSORS))
    assert json.loads((snap / "trainer_state.json").read_text())["parallel"] == "fsdp"
    assert state.keys() == ref_state.keys()
    for key in ref_state:
        if key != "rng/torch":  # full (gathered) tensors, not one rank's shard
            assert state[key].shape == ref_state[key].shape, key
            assert torch.allclose(state[key], ref_state[key], rtol=1e-4, atol=1e-6), key
    a, b = load_factored(tmp_path / "one").state_dict(), load_factored(tmp_path / "two").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not state_dir_for(tmp_path / "two").exists()


def test_bf16_autocast_keeps_the_loss_within_a_stated_tolerance_of_fp32():
    """CPU bf16 autocast rounds the forwards' matmuls only: the weights and Adam stay fp32 and the
    per-step losses (on-the-fly and top-k teacher) stay within 2% of the fp32 run's."""
    torch.manual_seed(0)
    windows, held = torch.randint(0, 200, (8, 32)), torch.randint(0, 200, (2, 32))
    for top_k in (None, 16):
        reports = {}
        for bf16 in (False, True):
            student, teacher = _models()
            cfg = FinetuneConfig(steps=4, lr=3e-3, samples=8, seq_len=32, held_out=2, batch_size=2, top_k=top_k, bf16=bf16)
            reports[bf16] = finetune(student, teacher, windows, held, cfg, progress=False)
            assert {p.dtype for p in student.parameters()} == {torch.float32}
        fp32, bf16 = reports[False], reports[True]
        assert bf16["loss"] != fp32["loss"]  # the autocast did round something
        assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.02)
        assert bf16["held_out_kl_after"] == pytest.approx(fp32["held_out_kl_after"], rel=0.01)
        assert bf16["held_out_kl_before"] == fp32["held_out_kl_before"]  # the held-out KL is always fp32


def test_snapshots_are_the_model_after_those_steps(pair, tmp_path):
    dense, factored, text = pair
    cfg = FinetuneConfig(steps=4, lr=3e-3, samples=8, seq_len=16, held_out=2, batch_size=2)
    with pytest.raises(FactorlmError, match="snapshot steps"):
        finetune_checkpoint(factored, dense, tmp_path / "bad", str(text), cfg, progress=False, snapshot_steps=[5])
    out, _ = finetune_checkpoint(factored, dense, tmp_path / "out", str(text), cfg, progress=False, snapshot_steps=[2, 4])
    snaps = out.with_name(out.name + ".snapshots")
    assert sorted(p.name for p in snaps.iterdir()) == ["step-2", "step-4"]
    last, final, mid = (load_factored(p).state_dict() for p in (snaps / "step-4", out, snaps / "step-2"))
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert not all(torch.equal(mid[k], final[k]) for k in final)
    # the step-2 snapshot equals a 2-step stop of the same run (same schedule, same data)
    state, _ = finetune_checkpoint(factored, dense, tmp_path / "stop", str(text),
                                   FinetuneConfig(**{**cfg.__dict__, "save_every": 2}), progress=False, stop_after=2)
    from safetensors.torch import load_file
    saved = load_file(str(state / "trainer_state.safetensors"))
    trained = {k[len("param/"):]: v for k, v in saved.items() if k.startswith("param/")}
    assert trained and all(torch.equal(v, mid[k]) for k, v in trained.items())
