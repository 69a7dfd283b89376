"""The census (tp/testing/census.py) on a few model types, one of each kind of outcome, the command's
output, and the committed docs/coverage.md against the installed transformers. The full census is
`python -m tp census --write-docs`."""

import json
from pathlib import Path

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import tp
import tp.testing.census
from tp.cli import main
from tp.testing.census import Row, census_row, render

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


# The command. gemma3n is a type whose tiny model does not build: its row needs no process.


@pytest.fixture
def census(capsys, monkeypatch, tmp_path):
    """``census(*args)`` -> (exit code, stdout, stderr) of ``python -m tp census ARGS`` in an empty directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")

    def call(*args):
        code = main(["census", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def test_census_prints_the_table_and_writes_no_file(census, tmp_path):
    code, out, err = census("--types", "gemma3n")
    assert code == 0
    assert out.startswith("# Coverage") and "| gemma3n | | | does not build |" in out
    assert list(tmp_path.iterdir()) == []
    assert "1/1" in err  # the progress bar, on stderr


def test_census_writes_the_table_where_output_says(census, tmp_path):
    code, out, _ = census("--types", "gemma3n", "--output", "sub/table.md")
    assert code == 0
    written = (tmp_path / "sub" / "table.md").read_text()
    assert "| gemma3n | | | does not build |" in written and "| gemma3n" not in out
    assert out.rstrip().endswith("written to sub/table.md")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["table.md"]


def test_census_json_holds_the_rows_and_the_counts(census):
    code, out, _ = census("--types", "gemma3n", "--json")
    data = json.loads(out)
    assert code == 0 and data["summary"] == {"model_types": 1, "build": 0, "verified": 0, "partial": 0,
                                             "refused": 0, "wrong": 0, "error": 0}
    assert data["rows"][0]["model_type"] == "gemma3n" and data["rows"][0]["status"] == "does not build"
    assert data["failed"] == [] and data["written_to"] is None


def test_census_exits_1_when_a_row_is_wrong(census, monkeypatch):
    wrong = Row("llama", source="registry (llama)", results={2: "verified", 4: "wrong"})
    monkeypatch.setattr(tp.testing.census, "census_row", lambda model_type, pools: wrong)
    code, out, err = census("--types", "llama")
    assert code == 1 and "| llama | registry (llama) |  | verified | wrong |" in out
    assert err.rstrip().endswith("wrong or an error: llama")


@pytest.mark.parametrize("args, expected", [
    (("--types", "lamma"), "error: unknown model type 'lamma': not a causal-LM type of the installed transformers "
                           "(did you mean llama"),
    (("--types", "llama", "--write-docs"), "error: --write-docs rewrites the whole committed table"),
    (("--output", "x.md", "--write-docs"), "error: give --output FILE or --write-docs, not both"),
])
def test_census_refuses_bad_arguments_before_it_starts(capsys, monkeypatch, tmp_path, args, expected):
    monkeypatch.chdir(tmp_path)
    assert main(["census", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(expected) and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
