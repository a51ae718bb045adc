import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import factorlm  # noqa: F401  (registers the transformers quantizer)
from factorlm.runtime.arch import compressible_linears, get_arch
from factorlm.runtime.checkpoint import factorize_model, load_factored, load_model, save_factored
from factorlm.runtime.factored_linear import FactoredLinear
from factorlm.runtime.format import FactorlmError, FormatError
from factorlm.testing import TINY_CONFIGS, make_tiny_model, write_tiny_factored

ARCHS = sorted(TINY_CONFIGS)
IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3]])


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_exact(tmp_path, arch):
    model, tok = make_tiny_model(arch)
    ranks = {n: 8 for n in compressible_linears(model)}
    factorize_model(model, ranks)
    save_factored(model, tmp_path / "ck", tokenizer=tok)
    loaded = load_factored(tmp_path / "ck")
    for name, module in compressible_linears(loaded).items():
        assert isinstance(module, FactoredLinear) and module.rank == 8
    original = dict(model.state_dict())
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    # tensors are bit-exact; logits may differ in the last bits because GEMM kernels pick
    # different paths for differently aligned buffers
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_from_pretrained_matches_load_factored(tmp_path, arch):
    path = write_tiny_factored(tmp_path / "ck", arch, rank=8)
    ours = load_factored(path)
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(hf.get_submodule(get_arch(hf.config).layers_path)[0].self_attn.q_proj, FactoredLinear)
    torch.testing.assert_close(hf(IDS).logits, ours(IDS).logits, atol=0, rtol=0)


def test_mixed_dense_and_factored(tmp_path):
    model, tok = make_tiny_model("llama")
    names = list(compressible_linears(model))
    factorize_model(model, {names[0]: 8, names[5]: 16})
    save_factored(model, tmp_path / "ck", tokenizer=tok)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert cfg["ranks"] == {names[0]: 8, names[5]: 16}
    loaded = load_model(tmp_path / "ck")
    assert isinstance(loaded.get_submodule(names[1]), torch.nn.Linear)
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-5)


def test_dense_folder_loads_through_load_model(tmp_path):
    model, tok = make_tiny_model("qwen3")
    model.save_pretrained(tmp_path / "dense")
    loaded = load_model(tmp_path / "dense")
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)


# ----------------------------------------------------------------------------- bad input


def _edit_config(path, fn):
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    fn(cfg)
    cfg_path.write_text(json.dumps(cfg))


def test_unknown_format_version(tmp_path):
    path = write_tiny_factored(tmp_path / "ck")
    _edit_config(path, lambda c: c["quantization_config"].update(format_version=99))
    with pytest.raises(FormatError, match="unknown factorlm format_version 99"):
        load_factored(path)
    with pytest.raises(Exception, match="format_version 99"):
        AutoModelForCausalLM.from_pretrained(path)


def test_missing_tensor_names_module(tmp_path):
    path = write_tiny_factored(tmp_path / "ck")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_v"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError, match="missing tensor 'model.layers.1.mlp.up_proj.weight_v'"):
        load_factored(path)


def test_wrong_shape_names_file_and_module(tmp_path):
    path = write_tiny_factored(tmp_path / "ck", rank=8)
    _edit_config(path, lambda c: c["quantization_config"]["ranks"].update({"model.layers.0.self_attn.o_proj": 16}))
    with pytest.raises(FormatError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.o_proj\.weight_u' has shape"):
        load_factored(path)


def test_rank_above_layer_limit(tmp_path):
    path = write_tiny_factored(tmp_path / "ck")
    _edit_config(path, lambda c: c["quantization_config"]["ranks"].update({"model.layers.0.self_attn.k_proj": 65}))
    with pytest.raises(FormatError, match="k_proj'.*rank 65 exceeds min"):
        load_factored(path)


def test_unsupported_architecture_lists_supported(tmp_path):
    path = write_tiny_factored(tmp_path / "ck")
    _edit_config(path, lambda c: c.update(model_type="gpt2"))
    with pytest.raises(FactorlmError, match="unsupported architecture 'gpt2'; supported model_type values: gemma3_text, llama"):
        get_arch("gpt2")


def test_existing_output_is_refused_and_untouched(tmp_path):
    model, tok = make_tiny_model()
    factorize_model(model, {n: 8 for n in compressible_linears(model)})
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FactorlmError, match="output directory exists"):
        save_factored(model, out)
    assert (out / "keep.txt").read_text() == "mine"
    save_factored(model, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp folders left behind


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model, tok = make_tiny_model()
    factorize_model(model, {n: 8 for n in compressible_linears(model)})

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_factored(model, tmp_path / "ck", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []


def test_missing_folder(tmp_path):
    with pytest.raises(FactorlmError, match="checkpoint folder not found"):
        load_factored(tmp_path / "nope")
    with pytest.raises(FactorlmError, match="model folder not found"):
        load_model(tmp_path / "nope")


def test_pickle_only_folder_is_refused(tmp_path):
    model, _ = make_tiny_model()
    model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FormatError, match="safetensors only"):
        load_model(tmp_path)
