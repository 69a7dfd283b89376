"""The census (tp/testing/census.py) on a few model types, one of each kind of outcome, and the committed
docs/coverage.md against the installed transformers. The full census is `python -m tp census`."""

from pathlib import Path

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import tp
import tp.testing.census
from tp.testing.census import census_row, render

COVERAGE = Path(__file__).resolve().parents[1] / "docs" / "coverage.md"


@pytest.fixture(scope="module")
def rows(pool2):
    types = ("llama", "apertus", "diffllama", "zaya")
    return {t: census_row(t, {2: pool2}, (2,)) for t in types}


def test_registry_family(rows):
    row = rows["llama"]
    assert (row.source, row.results[2], row.per_layer) == ("registry (llama)", "verified", "2 / 2")
    assert row.logits <= 1e-5 and row.grad <= 1e-4


def test_inferred_plan_with_gradient_sums(rows):
    """Apertus: transformers' plan leaves alpha_p / alpha_n without gradient sync; ours sums them."""
    row = rows["apertus"]
    assert row.results[2] == "verified" and row.source == "inferred + transformers plan"
    assert row.per_layer == "2 / 6"  # backward: 2 all-reduces + q_norm, k_norm, alpha_p, alpha_n


def test_partial_plan_names_what_stays_whole(rows):
    """DiffLlama's attention splits its heads in two halves: sharding heads fails the trial."""
    row = rows["diffllama"]
    assert row.results[2] == "partial"
    assert "self_attn.o_proj stays whole" in row.note and row.per_layer == "1 / 1"


def test_refusal_gives_the_reason(rows):
    assert rows["zaya"].results[2].startswith("refused: ")
    assert "can be sharded safely" in rows["zaya"].results[2]


def test_render_counts_outcomes(rows):
    text = render(list(rows.values()), "x", 60)
    assert "verified correct at TP=2, forward and backward: **3 of 4 (75%)**" in text
    assert "refused with a reason: 1; wrong results: 0; errors: 0" in text


def test_committed_coverage_lists_every_installed_type():
    listed = {line.split("|")[1].strip() for line in COVERAGE.read_text().splitlines()[1:]
              if line.startswith("| ") and not line.startswith("| model type")}
    assert listed == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), "rerun `python -m tp census`"


def test_committed_coverage_has_no_wrong_result():
    text = COVERAGE.read_text()
    assert "wrong results: 0;" in text
    assert not [line for line in text.splitlines() if "| wrong |" in line]


def test_refused_model_raises_plan_error_in_apply(pool2):
    with pytest.raises(tp.errors.PlanError, match="can be sharded safely"):
        tp.verify(model_factory=_zaya, tp=2, pool=pool2)


def test_token_ids_fit_the_logits_and_rwkv_checks_in_training_mode():
    """CPM-Ant's embedding also holds prompt tokens its logits lack; RWKV's eval forward updates
    its state in place, which backward cannot go through."""
    from tp.checks.compare import for_checking, token_ids

    cpmant = tp.testing.census.tiny_model("cpmant")
    ids = token_ids(cpmant, (4, 64), torch.Generator().manual_seed(0))
    assert int(ids.max()) < cpmant.get_output_embeddings().out_features < cpmant.get_input_embeddings().num_embeddings
    assert for_checking(tp.testing.census.tiny_model("rwkv")).training and not for_checking(cpmant).training
    assert tp.testing.census.build_problem("cpmant") is None and tp.testing.census.build_problem("rwkv") is None


def _zaya():
    return tp.testing.census.tiny_model("zaya")
