"""Recipes as data: a checkpoint's factorlm_recipe.yaml replays to the same tensors; bad recipes fail early."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from factorlm.cli import main
from factorlm.compressor import (CORRECTOR_FIELDS, HEAL_FIELDS, RECIPE_FILE, RECIPE_FORMAT_VERSION, CompressionRecipe,
                                 CorrectorConfig, FinetuneConfig, compress, load_recipe)
from factorlm.runtime.format import FactorlmError
from factorlm.testing import save_tiny_dense

TEXT = "Calibration text about gardens, rivers and old stone bridges in the hills, and a fox. " * 60
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    (root / "c.txt").write_text(TEXT)
    return save_tiny_dense(root / "d"), str(root / "c.txt")


@pytest.fixture
def no_long_work(monkeypatch):
    """Loading a model or starting a compression fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError("long work started before the recipe was checked")

    for target in ("factorlm.compressor.pipeline.compress_checkpoint", "factorlm.runtime.checkpoint.load_model",
                   "factorlm.sample_model.materialize_sample_model"):
        monkeypatch.setattr(target, boom)


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta and sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert ta[name].equal(tb[name]), f"{name} differs"


def cli(*argv: str) -> int:
    return main([*argv, "--no-progress"])


def test_recipe_round_trip_is_bit_for_bit(dense, tmp_path):
    src, calib = dense
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli("compress", str(src), "-o", str(first), "--method", "saes", "--allocation", "mgaa", "--keep", "0.7",
               "--calib", calib, "--calib-samples", "4", "--calib-len", "32", "--seed", "3") == 0
    saved = yaml.safe_load((first / RECIPE_FILE).read_text())
    assert saved["format_version"] == RECIPE_FORMAT_VERSION
    assert saved["dtype"] == "fp32" and saved["calib"] == calib and saved["seed"] == 3
    assert cli("compress", str(src), "--recipe", str(first / RECIPE_FILE), "-o", str(second)) == 0
    assert_same_tensors(first, second)
    assert load_recipe(second / RECIPE_FILE) == load_recipe(first / RECIPE_FILE)


def test_recipe_with_correctors_and_healing_round_trips(dense, tmp_path):
    """Correctors and a healing (distillation) stage are recipe fields too, and replay to the same tensors."""
    src, calib = dense
    recipe = CompressionRecipe(method="svd-llm", allocation="uniform", keep=0.6, calib=calib, calib_samples=4,
                               calib_len=32, corrector={"rank": 8, "layer_steps": 2, "block_steps": 2},
                               heal={"steps": 2, "samples": 2, "seq_len": 32, "held_out": 1, "lr": 1e-4})
    path, report = compress(src, tmp_path / "a", recipe, progress=False)
    assert report["heal"]["held_out_kl_after"] is not None
    assert (path / "factorlm_finetune.json").is_file() and not list(tmp_path.glob(".a.compressed-*"))
    saved = load_recipe(path / RECIPE_FILE)
    assert saved.corrector["rank"] == 8 and saved.heal["steps"] == 2
    again, _ = compress(src, tmp_path / "b", path / RECIPE_FILE, progress=False)
    assert_same_tensors(path, again)


def test_flags_beside_recipe_override_its_fields(dense, tmp_path):
    src, calib = dense
    recipe = tmp_path / "r.yaml"
    recipe.write_text(CompressionRecipe(method="saes", allocation="mgaa", keep=0.8, calib=calib, calib_samples=4,
                                        calib_len=32).to_yaml())
    out = tmp_path / "o"
    # --method svd is the flag's default value, given explicitly: it still overrides the recipe's saes
    assert cli("compress", str(src), "--recipe", str(recipe), "-o", str(out), "--method", "svd",
               "--reduction", "0.2", "--allocation", "uniform") == 0
    saved = load_recipe(out / RECIPE_FILE)
    assert (saved.method, saved.allocation, saved.keep, saved.reduction) == ("svd", "uniform", None, 0.2)
    assert (saved.calib, saved.calib_samples, saved.calib_len) == (calib, 4, 32)  # the rest from the file


def _one_line_error(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("factorlm: error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("edit, fragments", [
    ({"kepp": 0.8}, ["unknown recipe key 'kepp'"]),
    ({"heal": {"steps": 2, "stepz": 1}}, ["unknown recipe key 'heal.stepz'"]),
    ({"calib_samples": "many"}, ["recipe key 'calib_samples' must be int", "'many'"]),
    ({"sequential": 1}, ["recipe key 'sequential' must be bool"]),
    ({"corrector": {"rank": 1.5}}, ["recipe key 'corrector.rank' must be int or null"]),
    ({"keep": 1.5}, ["recipe key 'keep' must be in (0, 1]"]),
    ({"calib": "data/wikitext-2-raw/wiki.train.raw"}, ["WikiText-2"]),
    ({"format_version": RECIPE_FORMAT_VERSION + 1}, [f"format_version {RECIPE_FORMAT_VERSION + 1} is newer",
                                                     "upgrade factorlm"]),
])
def test_bad_recipe_is_refused_before_any_work(dense, tmp_path, capsys, no_long_work, edit, fragments):
    src, calib = dense
    data = dataclasses.asdict(CompressionRecipe(method="saes", calib=calib))
    data.update(edit)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "o"
    line = _one_line_error(capsys, ["compress", str(src), "--recipe", str(recipe), "-o", str(out)], *fragments)
    assert str(recipe) in line
    assert not out.exists()


def test_newer_version_is_refused_even_with_new_keys(tmp_path):
    recipe = tmp_path / "new.yaml"
    recipe.write_text(yaml.safe_dump({"format_version": 99, "method": "saes", "quantize": {"bits": 4}}))
    with pytest.raises(FactorlmError, match=r"format_version 99 is newer than this factorlm reads \(up to 1\)"):
        load_recipe(recipe)


def test_unknown_method_in_recipe_fails_before_loading(dense, tmp_path, capsys, no_long_work):
    src, _ = dense
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: magic\n")
    _one_line_error(capsys, ["compress", str(src), "--recipe", str(recipe), "-o", str(tmp_path / "o")],
                    "unknown method 'magic'")


def test_recipe_without_format_version_reads_as_version_1(tmp_path):
    """Recipes written before format_version existed (correctors under extra) still load."""
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump({"method": "saes", "keep": 0.8, "extra": {"corrector": {"rank": 4}}}))
    loaded = load_recipe(recipe)
    assert loaded.format_version == 1 and loaded.corrector == {"rank": 4} and loaded.extra == {}


def test_section_schemas_match_the_configs():
    assert set(CORRECTOR_FIELDS) == {f.name for f in dataclasses.fields(CorrectorConfig)}
    run_settings = {"cache_dir", "save_every", "device", "parallel"}
    assert set(HEAL_FIELDS) - {"calib"} == {f.name for f in dataclasses.fields(FinetuneConfig)} - run_settings


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid_and_cite_their_measurement(path):
    recipe = load_recipe(path)
    assert (recipe.method, recipe.allocation) == ("saes", "mgaa")
    assert recipe.calibration_source() and "wiki" not in recipe.calibration_source().lower()
    assert "measured" in path.read_text().split("\n", 1)[0].lower() or "benchmarks/results" in path.read_text()


def test_recipes_are_shipped():
    assert {p.name for p in RECIPES.glob("*.yaml")} >= {"smollm2-keep0.9.yaml", "smollm2-keep0.8.yaml",
                                                        "smollm2-keep0.6.yaml"}
