"""asvd / svd-llm through the compress pipeline on a tiny model; calibration windows."""

import pytest
import torch

from factorlm.runtime.format import FactorlmError
from factorlm.testing import save_tiny_dense

TEXT = "Calibration text about gardens, rivers and old stone bridges in the hills. " * 40


@pytest.mark.parametrize("method", ["asvd", "svd-llm"])
def test_compress_cli_calibrated(tmp_path, method):
    from factorlm.cli import main
    from factorlm.runtime.checkpoint import load_model

    torch.set_num_threads(1)
    src = save_tiny_dense(tmp_path / "d")
    calib = tmp_path / "c.txt"
    calib.write_text(TEXT)
    out = tmp_path / "f"
    assert main(["compress", str(src), "-o", str(out), "--method", method, "--keep", "0.6", "--calib", str(calib),
                 "--calib-samples", "4", "--calib-len", "32", "--no-progress"]) == 0
    model = load_model(out)
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    assert (out / "factorlm_report.json").is_file()


def test_svdllm_output_error_below_svd():
    from factorlm.compressor.methods import MethodOptions, get_method
    from factorlm.compressor.streaming import block_statistics, capture_block_inputs, split_batches
    from factorlm.compressor.whitening import svd_factors
    from factorlm.runtime.arch import decoder_layers, get_arch
    from factorlm.testing import make_tiny_model

    torch.set_num_threads(1)
    model, tok = make_tiny_model()
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"])[:128].reshape(4, 32)
    captured = capture_block_inputs(model, split_batches(ids, 2))
    names = get_arch(model.config).block_linear_names()
    block = decoder_layers(model)[0]
    with torch.no_grad():
        stats = block_statistics(block, names, captured.hidden, None, captured.block_kwargs[0], torch.device("cpu")).stats
    name = names[0]
    w = block.get_submodule(name).weight.detach().double()
    rank = min(w.shape) // 3
    u, v, _ = get_method("svd-llm").factorize(w, stats[name], rank, MethodOptions())
    a, b = svd_factors(w, rank)
    gram = stats[name].gram

    def err(m):
        d = w - m
        return float(torch.trace(d @ gram @ d.T))
    assert err(u @ v) <= err(a @ b)


def test_calibration_too_short(tmp_path):
    from factorlm.compressor.calib_sources import calibration_windows
    from factorlm.testing import make_tiny_model

    _, tok = make_tiny_model()
    p = tmp_path / "c.txt"
    p.write_text("short")
    with pytest.raises(FactorlmError, match="too short"):
        calibration_windows(tok, p, 2, 64)
    p.write_text("  ")
    with pytest.raises(FactorlmError, match="empty"):
        calibration_windows(tok, p, 2, 64)
