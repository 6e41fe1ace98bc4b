"""The prior file card the graph editor shows: provenance fields, and the name-level match with the connected model."""

from calibrated_cache.priors.card import MATCH, MISMATCH, UNKNOWN, match_connected, prior_card

META = {"model": {"family": "Flux", "architecture": "ab12", "weights": "cd34", "patches": "", "name": "flux1-dev.safetensors"},
        "policy_tag": "FORA_N3_W1_G2", "variant": "drift", "steps": "20", "sampler": "euler", "scheduler": "simple",
        "cfg": "3.5", "samples": "4", "created": "2026-11-22T10:00:00+00:00", "pack_version": "0.1.0",
        "held_out": "1", "report": {"held_out_before": 0.05, "held_out_after": 0.02, "sites": 12}}


def test_the_card_types_the_string_metadata_for_display():
    card = prior_card(META)
    assert (card["model"], card["family"], card["steps"], card["cfg"], card["samples"], card["held_out"]) == (
        "flux1-dev.safetensors", "Flux", 20, 3.5, 4, 1)
    assert (card["error_before"], card["error_after"], card["lora"], card["icc_statistics"]) == (0.05, 0.02, False, False)
    assert card["error_on"] == "held-out"


def test_a_file_from_before_held_out_fits_shows_its_in_sample_error_as_such():
    old = {**META, "report": {"rel_l2_before": 0.05, "rel_l2_after": 0.02}}
    del old["held_out"]
    card = prior_card(old)
    assert (card["error_on"], card["error_before"], card["held_out"]) == ("in-sample", 0.05, None)
    assert prior_card({**META, "report": {}})["error_on"] is None


def test_a_card_of_odd_metadata_has_gaps_not_errors_and_stays_json():
    card = prior_card({"model": ["not", "a", "dict"], "steps": "many", "report": {"rel_l2_before": float("nan"),
                                                                                 "rel_l2_after": float("inf")}})
    assert card["model"] == "(not recorded)" and card["steps"] is None
    assert card["error_before"] is None and card["error_after"] is None


def test_the_same_model_file_matches_and_another_one_does_not():
    assert match_connected(META, "flux1-dev.safetensors", False)["verdict"] == MATCH
    assert match_connected(META, "flux/flux1-dev.safetensors", None)["verdict"] == MATCH  # a subfolder of the list
    other = match_connected(META, "flux1-schnell.safetensors", False)
    assert other["verdict"] == MISMATCH and "flux1-schnell.safetensors" in other["reason"]


def test_a_lora_on_one_side_only_is_a_mismatch_and_on_both_is_left_to_the_run():
    added = match_connected(META, "flux1-dev.safetensors", True)
    assert added["verdict"] == MISMATCH and "without LoRAs, and one is connected" in added["reason"]
    patched = {**META, "model": {**META["model"], "patches": "lora:1/1/ab"}}
    assert match_connected(patched, "flux1-dev.safetensors", False)["verdict"] == MISMATCH
    both = match_connected(patched, "flux1-dev.safetensors", True)
    assert both["verdict"] == MATCH and "checked when the run starts" in both["reason"]


def test_an_untraceable_model_or_an_unnamed_file_is_unknown():
    assert match_connected(META, None, None)["verdict"] == UNKNOWN
    unnamed = {**META, "model": {k: v for k, v in META["model"].items() if k != "name"}}
    assert match_connected(unnamed, "flux1-dev.safetensors", False)["verdict"] == UNKNOWN
