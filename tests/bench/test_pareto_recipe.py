import pytest

from factorlm.bench.pareto import compress_args, load_score, recipe_hash, save_score, validate_recipe


def test_hash_depends_on_recipe_and_keep():
    base = recipe_hash({}, 0.8)
    assert base == recipe_hash({"method": "saes"}, 0.8)
    assert base != recipe_hash({}, 0.9)
    assert base != recipe_hash({"finetune_steps": 60}, 0.8)


def test_bad_recipe_names_key_and_source():
    with pytest.raises(ValueError, match="r.yaml: unknown key 'foo'"):
        validate_recipe({"foo": 1}, "r.yaml")
    with pytest.raises(ValueError, match="'calib_len' must be int"):
        validate_recipe({"calib_len": "512"})


def test_score_cache_roundtrip(tmp_path):
    assert load_score(tmp_path, "abc") is None
    save_score(tmp_path, "abc", {"ppl": 21.1})
    assert load_score(tmp_path, "abc") == {"ppl": 21.1}
    args = compress_args({}, 0.8, tmp_path / "o")
    assert args[args.index("--keep") + 1] == "0.8"
