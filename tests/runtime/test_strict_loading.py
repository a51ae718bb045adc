"""Broken checkpoints are refused with the same message by every reader, before any data is read.

Each case builds a tiny factored checkpoint, breaks it one way, and checks that
``load_factored``, transformers ``from_pretrained`` (the registered quantizer) and
``verify_folder`` (behind ``factorlm inspect --verify``) all name the problem.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import factorlm  # noqa: F401  (registers the transformers quantizer)
from factorlm.runtime.checkpoint import load_factored, load_model, safetensors_files
from factorlm.runtime.format import FormatError
from factorlm.runtime.safetensors_header import read_header
from factorlm.runtime.verify import verify_folder
from factorlm.testing import save_tiny_dense, write_tiny_factored

MOD = "model.layers.1.mlp.up_proj"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_tiny_factored(tmp_path_factory.mktemp("ck") / "ck", rank=8)


@pytest.fixture
def ck(pristine, tmp_path):
    import shutil

    return shutil.copytree(pristine, tmp_path / "ck")


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_block(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def _refused_alike(path, match):
    """load_factored and from_pretrained raise the same FormatError; verify_folder lists it too."""
    with pytest.raises(FormatError, match=match) as ours:
        load_factored(path)
    with pytest.raises(FormatError) as hf:
        AutoModelForCausalLM.from_pretrained(path)
    assert str(hf.value) == str(ours.value)
    problems, _ = verify_folder(path, safetensors_files(path))
    assert problems and problems[0] == str(ours.value).split(" (and ")[0]
    return str(ours.value)


def test_pristine_checkpoint_verifies(pristine):
    problems, summary = verify_folder(pristine, safetensors_files(pristine))
    assert problems == []
    assert summary["factored"] == 14 and summary["files"] == 1


def test_missing_factor(ck):
    _edit_tensors(ck, lambda t: t.pop(f"{MOD}.weight_v"))
    msg = _refused_alike(ck, f"missing tensor '{MOD}.weight_v' for module '{MOD}'")
    assert msg.startswith(str(ck))


def test_missing_dense_weight(ck):
    _edit_tensors(ck, lambda t: t.pop("model.norm.weight"))
    _refused_alike(ck, "missing tensor 'model.norm.weight' for module 'model.norm'")


def test_factors_of_a_module_ranks_does_not_list(ck):
    _edit_block(ck, lambda b: b["ranks"].pop(MOD))
    msg = _refused_alike(ck, f"tensor '{MOD}.weight_u' is a factor of module '{MOD}', which 'ranks' in config.json "
                             "does not list")
    assert "model.safetensors" in msg


def test_listed_module_stored_dense(tmp_path):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    path = write_tiny_factored(tmp_path / "ck", ranks={names[0]: 8})
    _edit_block(path, lambda b: b["ranks"].update({names[1]: 8}))
    _refused_alike(path, f"module '{names[1]}' is listed in 'ranks' but the checkpoint stores it dense")


def test_listed_module_without_any_tensor(ck):
    _edit_tensors(ck, lambda t: [t.pop(f"{MOD}.weight_u"), t.pop(f"{MOD}.weight_v")])
    _refused_alike(ck, f"missing tensor '{MOD}.weight_u'")


def test_module_in_ranks_that_does_not_exist(ck):
    _edit_block(ck, lambda b: b["ranks"].update({"model.layers.7.mlp.up_proj": 8}))
    _refused_alike(ck, r"config\.json: module 'model\.layers\.7\.mlp\.up_proj' listed in 'ranks' does not exist")


def test_wrong_rank_in_config_is_a_shape_error(ck):
    _edit_block(ck, lambda b: b["ranks"].update({MOD: 16}))
    msg = _refused_alike(ck, rf"model\.safetensors: tensor '{MOD}\.weight_u' has shape \(128, 8\), module expects "
                             r"\(128, 16\)")
    assert "and 1 more problem" in msg  # weight_v is wrong too; inspect --verify lists both


def test_wrong_tensor_shape(ck):
    _edit_tensors(ck, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    _refused_alike(ck, r"tensor 'model\.norm\.weight' has shape \(65,\), module expects \(64,\)")


def test_factor_dtype_disagrees_with_config(ck):
    _edit_tensors(ck, lambda t: t.update({f"{MOD}.weight_u": t[f"{MOD}.weight_u"].half()}))
    _refused_alike(ck, f"tensor '{MOD}.weight_u' has dtype float16, but config.json says factor_dtype 'float32'")


def test_integer_tensor_for_a_float_parameter(ck):
    _edit_tensors(ck, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    _refused_alike(ck, "tensor 'model.norm.weight' has dtype int32, expected a floating-point dtype")


def test_unexpected_tensor(ck):
    _edit_tensors(ck, lambda t: t.update({"model.extra.weight": torch.ones(3)}))
    _refused_alike(ck, "unexpected tensor 'model.extra.weight'")


def test_stray_corrector(ck):
    _edit_tensors(ck, lambda t: t.update({f"{MOD}.corrector_a": torch.ones(4, 64)}))
    _refused_alike(ck, f"tensor '{MOD}.corrector_a' is a corrector of module '{MOD}', which 'corrector_ranks'")


def test_dense_weight_beside_factors(ck):
    _edit_tensors(ck, lambda t: t.update({f"{MOD}.weight": torch.ones(128, 64)}))
    _refused_alike(ck, f"tensor '{MOD}.weight' is the dense weight of module '{MOD}', which 'ranks'")


def test_dense_list_names_a_missing_module(ck):
    _edit_block(ck, lambda b: b["dense"].append("model.layers.0.mlp.nope"))
    _refused_alike(ck, "module 'model.layers.0.mlp.nope' listed in 'dense' does not exist")


def test_tied_weight_cannot_be_factored(tmp_path):
    path = write_tiny_factored(tmp_path / "ck", "gemma3_text", rank=8)
    problems, _ = verify_folder(path, safetensors_files(path))
    assert problems == []  # tied lm_head absent from the file is fine
    _edit_block(path, lambda b: b["ranks"].update({"lm_head": 8}))
    problems, _ = verify_folder(path, safetensors_files(path))
    assert "module 'lm_head' is listed in 'ranks' but its weight is tied to 'model.embed_tokens.weight'" in problems[0]


def test_many_problems_are_all_listed(ck):
    _edit_tensors(ck, lambda t: [t.pop(f"{MOD}.weight_v"), t.pop("model.norm.weight")])
    problems, _ = verify_folder(ck, safetensors_files(ck))
    assert len(problems) == 2
    with pytest.raises(FormatError, match=r"\(and 1 more problem; 'factorlm inspect --verify .*' lists them\)"):
        load_factored(ck)


# ----------------------------------------------------------------------------- damaged files


def _truncate(file, keep_fraction=0.6):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep_fraction)])


def _every_reader_names(path, file, match):
    for load in (load_factored, load_model, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(FormatError, match=match) as info:
            load(path)
        assert str(file) in str(info.value), load
    problems, _ = verify_folder(path, safetensors_files(path))
    assert str(file) in problems[0] and "not checked" in problems[-1]


def test_truncated_file_is_named_by_every_reader(ck):
    file = ck / "model.safetensors"
    _truncate(file)
    _every_reader_names(ck, file, "truncated safetensors file: its header promises")


def test_truncated_header_is_named(ck):
    file = ck / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    _every_reader_names(ck, file, "truncated or corrupt safetensors file")


def test_empty_file_is_named(ck):
    file = ck / "model.safetensors"
    file.write_bytes(b"")
    _every_reader_names(ck, file, "not a safetensors file")


def test_corrupt_header_is_named(ck):
    file = ck / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[10:30] = b"\xff" * 20
    file.write_bytes(bytes(data))
    _every_reader_names(ck, file, "corrupt safetensors header")


def test_trailing_bytes_are_corrupt(ck):
    file = ck / "model.safetensors"
    file.write_bytes(file.read_bytes() + b"\0" * 16)
    with pytest.raises(FormatError, match="16 bytes after the last tensor"):
        read_header(file)


def test_truncated_dense_folder_is_named(tmp_path):
    path = save_tiny_dense(tmp_path / "dense")
    _truncate(path / "model.safetensors")
    with pytest.raises(FormatError, match=r"dense/model\.safetensors: truncated safetensors file"):
        load_model(path)


def _shard(path):
    """Split a single-file checkpoint into two shards with an index, like save_pretrained does."""
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, path / shard, metadata={"format": "pt"})
    (path / "model.safetensors").unlink()
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_loads_and_verifies(ck):
    _shard(ck)
    assert verify_folder(ck, safetensors_files(ck))[0] == []
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(ck)(ids).logits, load_factored(ck)(ids).logits)


def test_truncated_shard_is_named(ck):
    _shard(ck)
    file = ck / "model-00002-of-00002.safetensors"
    _truncate(file)
    _every_reader_names(ck, file, "truncated safetensors file")


def test_index_that_misplaces_a_tensor(ck):
    weight_map = _shard(ck)
    weight_map["model.norm.weight"] = "model-00001-of-00002.safetensors"
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    problems, _ = verify_folder(ck, safetensors_files(ck))
    assert problems == [f"{ck / 'model.safetensors.index.json'}: lists tensor 'model.norm.weight' in "
                        "model-00001-of-00002.safetensors, but it is stored in model-00002-of-00002.safetensors"]
