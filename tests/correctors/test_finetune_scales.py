"""Scale-only distillation of a quantized checkpoint (factorlm finetune --train scales)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from factorlm.cli import main
from factorlm.compressor.finetune import FinetuneConfig, finetune_checkpoint
from factorlm.compressor.quantize import quantize_checkpoint
from factorlm.runtime.checkpoint import load_factored
from factorlm.runtime.format import FactorlmError, read_factored_config
from factorlm.runtime.quant import dequantize
from factorlm.runtime.quant_linear import QuantizedFactoredLinear, quantized_modules
from factorlm.testing import write_tiny_factored

TEXT = ("Quantized factors keep their integer codes; only the step size of each group moves. "
        "A teacher in floating point shows the student what its rounding lost. ") * 60


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory):
    """(fp32 factored folder, its int4 group-16 RTN copy, training text file)."""
    root = tmp_path_factory.mktemp("scales")
    factored = write_tiny_factored(root / "factored", rank=16)
    quantize_checkpoint(factored, root / "q4", bits=4, group_size=16, rounding="rtn")
    text = root / "train.txt"
    text.write_text(TEXT)
    return factored, root / "q4", text


def test_scales_move_codes_stay_and_the_held_out_kl_drops(quantized, tmp_path):
    factored, q4, text = quantized
    cfg = FinetuneConfig(steps=30, lr=1e-2, samples=8, seq_len=32, held_out=2, train="scales")
    out, report = finetune_checkpoint(q4, factored, tmp_path / "tuned", str(text), cfg, progress=False)
    assert report["held_out_kl_after"] < report["held_out_kl_before"]
    assert report["trained_params"] == sum(p.numel() for m in quantized_modules(load_factored(q4)).values()
                                           for n, p in m.named_buffers() if n.endswith("_scales"))
    before, after = load_file(q4 / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("_scales") for k in changed)  # codes, norms, embeddings as stored
    assert all(before[k].dtype == after[k].dtype and before[k].shape == after[k].shape for k in before)
    src_block, out_block = read_factored_config(q4), read_factored_config(out)
    assert (out_block.bits, out_block.group_size, out_block.rounding, out_block.ranks) == \
           (src_block.bits, src_block.group_size, src_block.rounding, src_block.ranks)
    assert (out / "factorlm_quantization.json").is_file()
    # the saved checkpoint computes exactly its new codes * scales, on the default (cached) kernel
    model = load_factored(out)
    name = "model.layers.0.mlp.down_proj"
    layer = model.get_submodule(name)
    assert isinstance(layer, QuantizedFactoredLinear) and layer.kernel == "cached"
    assert torch.equal(layer.dequantized("weight_v"), dequantize(after[f"{name}.weight_v_qweight"],
                                                                  after[f"{name}.weight_v_scales"], 4, 16))
    assert json.loads((out / "factorlm_finetune.json").read_text())["config"]["train"] == "scales"


def test_train_choice_must_fit_the_checkpoint(quantized, tmp_path, capsys):
    factored, q4, text = quantized
    with pytest.raises(FactorlmError, match="--train scales needs a quantized checkpoint"):
        finetune_checkpoint(factored, factored, tmp_path / "o1", str(text),
                            FinetuneConfig(steps=1, samples=1, seq_len=16, held_out=1, train="scales"), progress=False)
    with pytest.raises(FactorlmError, match="integer codes; train their scales"):
        finetune_checkpoint(q4, factored, tmp_path / "o2", str(text),
                            FinetuneConfig(steps=1, samples=1, seq_len=16, held_out=1), progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert main(["finetune", str(q4), "--teacher", str(factored), "-o", str(tmp_path / "o3"), "--calib", str(text),
                 "--train", "scales", "--steps", "2", "--samples", "2", "--seq-len", "24", "--held-out", "1",
                 "--no-progress"]) == 0
    assert "held-out KL to the teacher" in capsys.readouterr().out


def test_scale_learning_rate_is_relative_to_each_tensor():
    from torch import nn

    from factorlm.compressor.finetune import DEFAULT_LR, relative_lr

    named = {"v": nn.Parameter(torch.full((4,), 1e-3)), "u": nn.Parameter(torch.tensor([-2.0, 2.0]))}
    assert relative_lr(named, "scales") == {"v": pytest.approx(1e-3), "u": pytest.approx(2.0)}
    assert relative_lr(named, "all") is None
    assert FinetuneConfig(train="scales").lr == DEFAULT_LR["scales"] != FinetuneConfig().lr


def test_quantize_with_scale_steps_trains_the_scales_of_the_same_codes(quantized, tmp_path):
    factored, _, text = quantized
    common = dict(bits=4, group_size=16, rounding="gptq", calib=str(text), calib_samples=4, calib_len=32)
    quantize_checkpoint(factored, tmp_path / "plain", **common)
    info = quantize_checkpoint(factored, tmp_path / "tuned", **common, scale_steps=4)
    assert info["scale_training"]["held_out_kl_after"] < info["scale_training"]["held_out_kl_before"]
    plain, tuned = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "tuned" / "model.safetensors")
    assert plain.keys() == tuned.keys()
    assert all(torch.equal(plain[k], tuned[k]) for k in plain if not k.endswith("_scales"))  # same codes
    assert any(not torch.equal(plain[k], tuned[k]) for k in plain if k.endswith("_scales"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "tuned"]  # the untrained copy is gone
    assert json.loads((tmp_path / "tuned" / "factorlm_quantization.json").read_text())["scale_steps"] == 4


def test_compress_and_quantize_cli_take_scale_steps(tmp_path, capsys):
    from factorlm.testing import save_tiny_dense

    dense = save_tiny_dense(tmp_path / "dense")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "c4"
    assert main(["compress", str(dense), "-o", str(out), "--keep", "0.5", "--factor-bits", "4", "--group-size", "8",
                 "--rounding", "gptq", "--calib", str(text), "--calib-samples", "2", "--calib-len", "32",
                 "--scale-steps", "2", "--no-progress"]) == 0
    assert "scale training: held-out KL" in capsys.readouterr().out
    assert read_factored_config(out).bits == 4 and (out / "factorlm_finetune.json").is_file()
    assert not any(p.name.endswith(".untrained-scales") for p in tmp_path.iterdir())
    assert main(["compress", str(dense), "-o", str(tmp_path / "x"), "--scale-steps", "2"]) == 2
    assert "--scale-steps applies to quantized factors" in capsys.readouterr().err


def test_a_quantized_lm_head_keeps_its_scales(quantized, tmp_path):
    factored, _, text = quantized
    quantize_checkpoint(factored, tmp_path / "q4h", bits=4, group_size=16, lm_head=True)
    cfg = FinetuneConfig(steps=3, lr=1e-2, samples=3, seq_len=32, held_out=1, train="scales")
    out, _ = finetune_checkpoint(tmp_path / "q4h", factored, tmp_path / "tuned", str(text), cfg, progress=False)
    before, after = load_file(tmp_path / "q4h" / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(before["lm_head.weight_scales"], after["lm_head.weight_scales"])
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("_scales"))
