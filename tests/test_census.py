"""The census (tp/testing/census.py) on a few model types, one of each kind of outcome, the plan of
their published-size models on the meta device, the flag sweep, the command's output, and the
committed docs/coverage.md against the installed transformers. The full census is
`python -m tp census --write-docs`."""

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import tp
import tp.testing.census
from tp.cli import main
from tp.testing.census import FamilySweep, Row, census_row, published_plan, render
from tp.testing.flag_sweep import Case, run_case

COVERAGE = Path(__file__).resolve().parents[1] / "docs" / "coverage.md"
TYPES_TABLE = "| model type |"
FLAGS_TABLE = "| family |"


@pytest.fixture(scope="module")
def rows(pool2):
    types = ("llama", "apertus", "diffllama", "zaya")
    return {t: census_row(t, {2: pool2}, (2,)) for t in types}


def test_registry_family(rows):
    row = rows["llama"]
    assert (row.source, row.results[2], row.per_layer) == ("registry (llama)", "verified", "2 / 2")
    assert row.logits <= 1e-5 and row.grad <= 1e-4
    assert row.published == {2: "plans", 4: "plans", 8: "plans"}  # Llama-2-7B's sizes, on the meta device


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
    assert "verified correct at tiny default sizes at TP=2, forward and backward: **3 of 4 (75%)**" in text
    assert "refused with a reason: 1; wrong results: 0; errors: 0" in text
    assert "| llama | registry (llama) | full | verified |  | TP 2, 4, 8 |" in text  # TP=4 not run here
    published = {t: row.published_status for t, row in rows.items()}
    planned = sum(status in ("plans", "partial") for status in published.values())
    assert f"planned at published size on the meta device at TP=2: **{planned} of 4**" in text, published


# The published-size plan: the default config of the type, on the meta device. Each of these
# planned at tiny size but not at real size before its cause was fixed or named.


def test_a_text_model_no_auto_class_builds_alone_is_traced_on_a_twin_of_its_own_class():
    # Emu3's causal LM takes the text config of its composite (emu3_text_model), which
    # AutoModelForCausalLM does not take: its twin is a tiny Emu3ForCausalLM built from that class
    assert published_plan("emu3") == {2: "plans", 4: "plans", 8: "plans"}


def test_a_part_the_published_config_switches_off_is_off_in_the_twin():
    # GraniteMoeShared's default has no shared MLP (shared_intermediate_size=0); a twin with one has
    # another block structure, and nothing of the model would be planned
    assert published_plan("granitemoeshared", (2,)) == {2: "plans"}


def test_a_block_the_twin_cannot_have_is_refused_with_the_reason():
    # BigBird's default block-sparse attention falls back to full attention on short inputs, so a
    # traced twin never holds a block-sparse block
    found = published_plan("big_bird", (2,))[2]
    assert found.startswith("refused: BigBirdForCausalLM: no family in the registry recognises it"), found
    assert "here attention.self BigBirdBlockSparseAttention; in the twin attention.self BigBirdSelfAttention" in found


def test_a_default_config_transformers_cannot_build_is_named():
    assert published_plan("dbrx", (2,)) == {
        2: "does not build: AttributeError: 'DbrxAttentionConfig' object has no attribute 'rope_theta'"}


# The flag sweep: registered families with each option that changes their forward turned on


def test_a_flag_sweep_case_shards_exactly(pool2):
    # OLMo's clip_qkv clamps q, k and v in place, on the outputs of column-parallel linears
    assert run_case("olmo", "clip_qkv", 0.5, pool2) == Case("clip_qkv", 0.5, "verified")


def test_render_tells_the_flag_sweep_apart_from_the_tiny_defaults(rows):
    sweep = FamilySweep("llama", ["llama"], {
        2: [Case("attention_bias", True, "verified"), Case("mlp_bias", True, "verified"),
            Case("pretraining_tp", 2, "skipped", "the unsharded model does not run: ValueError: x")],
        4: [Case("attention_bias", True, "verified"), Case("mlp_bias", True, "refused", "SizeError: y"),
            Case("pretraining_tp", 2, "skipped", "the unsharded model does not run: ValueError: x")]})
    text = render(list(rows.values()), "x", 60, [sweep])
    assert ("- verified with the published configs' flags: 1 registered families, 3 options: **1 verified** at TP=2 "
            "and 4, 1 refused with a reason, 1 skipped") in text
    assert ("| llama | llama | attention_bias=True | mlp_bias=True | pretraining_tp=2 |  | mlp_bias=True: TP=4: "
            "SizeError: y; pretraining_tp=2: the unsharded model does not run: ValueError: x |") in text
    assert text.index("## Every type: at tiny default sizes") < text.index(TYPES_TABLE) < \
        text.index("## Registered families with the published configs' flags") < text.index(FLAGS_TABLE)


def _table(header: str) -> list[list[str]]:
    """The cells of each row of the committed table that starts with ``header``."""
    lines = COVERAGE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])])  # "\|" is in a cell
    return rows


def test_committed_coverage_lists_every_installed_type():
    """Every type of the installed transformers is in the table; on the release the census ran on,
    exactly those (an older supported release has fewer types)."""
    listed = {cells[0] for cells in _table(TYPES_TABLE)}
    installed = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert installed <= listed, f"rerun `python -m tp census`: {sorted(installed - listed)} missing"
    census_release = re.search(r"\(transformers ([0-9.]+),", COVERAGE.read_text()).group(1)
    if census_release == transformers.__version__:
        assert listed == installed, "rerun `python -m tp census`"


def test_committed_coverage_has_no_wrong_result():
    text = COVERAGE.read_text()
    assert "wrong results: 0;" in text
    assert not [cells for cells in _table(TYPES_TABLE) if "wrong" in cells[3:5]]


def test_committed_coverage_plans_every_type_at_published_size_or_says_why():
    """A type that works at tiny size plans at published size, or is refused with the reason
    (never an error); the flag sweep has no wrong result."""
    text = COVERAGE.read_text()
    assert re.search(r"^- planned at published size on the meta device at TP=2: .*; errors: 0$", text, re.M)
    for cells in _table(TYPES_TABLE):
        tiny, published, notes = cells[3], cells[5], cells[-1]
        assert published.startswith("TP ") or published in ("refused", "does not build"), cells
        if not published.startswith("TP 2"):
            assert "published size: " in notes, cells  # the reason
        if tiny in ("verified", "partial") and published == "does not build":
            assert "published size: " in notes, cells
    sweeps = _table(FLAGS_TABLE)
    assert sweeps and all(cells[5] == "" for cells in sweeps), "a flag of a registered family gives a wrong result"


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
    assert data["published_summary"] == {"model_types": 1, "plans": 0, "partial": 0, "refused": 0,
                                         "does not build": 1, "error": 0, "every_size": 0}
    assert data["flag_summary"] == {"families": 0, "options": 0, "verified": 0, "refused": 0, "skipped": 0,
                                    "wrong": 0} and data["flag_sweeps"] == []
    row = data["rows"][0]
    assert row["model_type"] == "gemma3n" and row["status"] == "does not build"
    assert row["published_status"] == "does not build" and "PIL" in row["published"]["2"]
    assert data["failed"] == [] and data["written_to"] is None


def test_census_exits_1_when_a_row_is_wrong(census, monkeypatch):
    wrong = Row("llama", source="registry (llama)", results={2: "verified", 4: "wrong"})
    monkeypatch.setattr(tp.testing.census, "census_row", lambda model_type, pools: wrong)
    monkeypatch.setattr(tp.testing.census, "swept_families", lambda rows: {})
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


def test_an_error_at_published_size_fails_the_census():
    assert Row("x", results={2: "verified"}, published={2: "error: KeyError: 'y'"}).failed
    assert not Row("x", results={2: "verified"}, published={2: "refused: why", 4: "plans"}).failed
