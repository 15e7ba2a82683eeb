"""The shared core: the architecture table against real (tiny) models, the record readers on every
layout and every malformed case, atomic writes, token conventions."""

import json
import stat
from dataclasses import replace

import pytest
from safetensors import safe_open

from memit_vllm.core.architectures import ARCHITECTURES, by_class, by_model_type, lora_classes
from memit_vllm.core.files import atomic_dir, atomic_file
from memit_vllm.core.records import (EditRequest, fact_text, load_requests, parse_record, read_dataset,
                                     read_prompts, read_records, read_subjects, validate_requests,
                                     without_conflicts)
from memit_vllm.core.tokens import pad_id, target_ids
from memit_vllm.errors import MemitError
from memit_vllm.testing.tiny_models import CONFIGS


def test_every_architecture_has_a_tiny_model():
    assert sorted(CONFIGS) == sorted(ARCHITECTURES), "add a tiny model (memit_vllm.testing.tiny_models) per entry"


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_table_entry_matches_the_real_model(model_type, tiny_models):
    import transformers

    arch = ARCHITECTURES[model_type]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[model_type])
    assert type(model).__name__ == arch.hf_class and model.config.model_type == model_type
    down = model.get_submodule(arch.module_name(1))
    d_model, d_ff = model.config.get_text_config().hidden_size, 128
    assert tuple(down.weight.shape) == ((d_ff, d_model) if arch.conv1d else (d_model, d_ff))
    with safe_open(tiny_models[model_type] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    name = arch.checkpoint_name(1, keys)
    assert arch.layer_of(name) == 1 and tuple(f_shape(tiny_models[model_type], name)) == tuple(down.weight.shape)
    others = [k for k in keys if arch.layer_of(k) is not None]
    assert len(others) == model.config.num_hidden_layers, "layer_of must match the down-projections only"
    assert by_class(arch.hf_class) is arch and by_model_type(model_type) is arch


def f_shape(model_dir, name):
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return f.get_slice(name).get_shape()


def test_a_made_up_architecture_in_the_table_is_enough_for_make_patch_and_apply(made_up_architecture, tmp_path,
                                                                                 data_dir):
    from memit_vllm import make_patch
    from memit_vllm.patch.tools import apply_patches, verify_patch

    facts = [{"prompt": "{} is located in", "subject": "The Louvre", "target_new": "Rome"}]
    patch = make_patch(made_up_architecture, facts, layers=[1, 2], stats_tokens=2000, progress=False,
                       stats_corpus=str(data_dir / "corpus" / "smollm2_self_2k.jsonl"), cache_dir=tmp_path / "cache")
    assert patch.base.architecture == "MadeUpForCausalLM"
    assert patch.layers == ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    path = patch.save(tmp_path / "p.patch")
    assert verify_patch(path, made_up_architecture)["architecture"] == "MadeUpForCausalLM"
    assert (apply_patches([patch], made_up_architecture, tmp_path / "out") / "model.safetensors").is_file()


def test_unknown_architectures_are_refused_naming_the_supported_ones():
    with pytest.raises(MemitError, match="'mixtral' is not supported.*llama"):
        by_model_type("mixtral")
    with pytest.raises(MemitError, match="LlamaForCausalLM"):
        by_class("MixtralForCausalLM")
    assert lora_classes() == ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]


def test_layer_of_accepts_prefixes_and_rejects_other_weights():
    gpt2, llama = ARCHITECTURES["gpt2"], ARCHITECTURES["llama"]
    assert gpt2.layer_of("h.3.mlp.c_proj.weight") == 3 == gpt2.layer_of("transformer.h.3.mlp.c_proj.weight")
    assert llama.layer_of("model.layers.12.mlp.down_proj.weight") == 12
    for other in ("model.layers.1.self_attn.q_proj.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.bias",
                  "model.layers.x.mlp.down_proj.weight", "lm_head.weight"):
        assert llama.layer_of(other) is None


# -- records -------------------------------------------------------------------------------------------
def test_every_layout_gives_the_same_request():
    want = EditRequest("{} is located in", "Eiffel Tower", " Rome", " Paris", "7")
    counterfact = {"case_id": 7, "requested_rewrite": {"prompt": "{} is located in", "subject": "Eiffel Tower",
                                                       "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}}}
    easyedit = {"case_id": 7, "prompt": "Eiffel Tower is located in", "subject": "Eiffel Tower",
                "target_new": "Rome", "ground_truth": "Paris"}
    ours = {"case_id": "7", "prompt": "{} is located in", "subject": "Eiffel Tower", "target_new": {"str": "Rome"},
            "target_true": "Paris"}
    for rec in (counterfact, easyedit, ours):
        assert parse_record(rec, "r") == want
    zsre = {"case_id": 7, "subject": "Eiffel Tower", "src": "Eiffel Tower is located in", "answers": "Rome",
            "alt": "Oslo", "rephrase": "x", "loc": "y", "loc_ans": "z"}
    assert parse_record(zsre, "r").target_new == " Rome"  # a bare string is one answer, not its letters
    assert parse_record(zsre, "r", "alt").target_new == " Oslo"


def test_paraphrases_are_templated_like_the_prompt_and_absent_from_headers_without_them():
    rec = {"prompt": "{} is located in", "subject": "Eiffel Tower", "target_new": "Rome",
           "paraphrases": ["Where is the Eiffel Tower? It is in", "People visit {} in the city of"]}
    r = parse_record(rec, "r")
    assert r.paraphrases == ("Where is the {}? It is in", "People visit {} in the city of")
    assert parse_record(r.to_dict(), "header") == r  # what a patch header records reads back the same
    assert "paraphrases" not in parse_record({**rec, "paraphrases": []}, "r").to_dict()
    with pytest.raises(MemitError, match="r paraphrase 1: subject 'Eiffel Tower' does not occur"):
        parse_record({**rec, "paraphrases": ["{} is in", "It is in"]}, "r")
    with pytest.raises(MemitError, match="paraphrases must be a list of strings"):
        parse_record({**rec, "paraphrases": {"a": 1}}, "r")
    with pytest.raises(MemitError, match="record 0: paraphrase 1 'It is in' must hold '{}' exactly once"):
        validate_requests([replace(r, paraphrases=("{} is in", "It is in"))])  # made in Python, not parsed


def test_braces_and_repeated_subjects_survive_templating():
    r = parse_record({"prompt": "In {x}, Paris of Paris is in", "subject": "Paris", "target_new": "a"}, "r")
    assert r.text() == "In {x}, Paris of Paris is in" and r.prompt.endswith("Paris of {} is in")


@pytest.mark.parametrize("rec, message", [
    ([1, 2], "must be a JSON object"),
    ({"requested_rewrite": {"subject": "s", "target_new": {"str": "a"}}}, "missing field 'prompt'"),
    ({"requested_rewrite": []}, "empty list"),
    ({"prompt": "{} x", "subject": "s", "target_new": True}, "target_new must be a non-empty string"),
    ({"prompt": "{} x", "subject": "s", "target_new": {"id": 3}}, "missing field 'str'"),
    ({"prompt": "{} x", "subject": "s", "target_new": " "}, "empty target_new"),
    ({"prompt": "a x", "subject": "s", "target_new": "t"}, "does not occur in prompt"),
    ({"subject": "s", "src": "s x", "answers": [], "alt": "a"}, "answers is an empty list"),
    ({"foo": 1}, "unknown record layout"),
])
def test_malformed_records_are_one_clear_error(rec, message):
    with pytest.raises(MemitError, match=message):
        parse_record(rec, "file.json record 3")


def test_request_files_name_the_line_and_reject_what_is_not_text(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text('{"prompt": "{} x", "subject": "s", "target_new": "t"}\n\n{"prompt": \n')
    with pytest.raises(MemitError, match=r"r.jsonl line 3 is not valid JSON"):
        load_requests(jsonl)
    jsonl.write_text('{"prompt": "{} x", "subject": "s", "target_new": "t"}\n[1]\n')
    with pytest.raises(MemitError, match=r"r.jsonl record 1 \(line 2\): a record must be a JSON object"):
        load_requests(jsonl)
    latin = tmp_path / "r.json"
    latin.write_bytes('[{"prompt": "{} caf\xe9", "subject": "s", "target_new": "t"}]'.encode("latin-1"))
    with pytest.raises(MemitError, match="not UTF-8"):
        load_requests(latin)
    with pytest.raises(MemitError, match="--limit -1"):
        load_requests(jsonl, limit=-1)
    csv = tmp_path / "r.csv"
    csv.write_text('prompt,subject,target_new\n"{} is, in",Rome,Italy\n')
    assert load_requests(csv) == [EditRequest("{} is, in", "Rome", " Italy")]
    assert read_records(csv)[0][0].endswith("r.csv row 2")


def test_a_key_given_twice_is_refused_not_read_as_its_last_value(tmp_path):
    """json and csv keep the last of two equal keys unseen: a second "target_new" would be edited silently."""
    rec = '{"prompt": "{} is in", "subject": "Rome", "target_new": "Italy", "target_new": "Spain"}'
    cases = {"r.json": f"[{rec}]", "r.jsonl": f'{{"prompt": "{{}} x", "subject": "s", "target_new": "t"}}\n{rec}\n',
             "r.csv": 'prompt,subject,target_new,target_new\n"{} is in",Rome,Italy,Spain\n'}
    messages = {"r.json": "r.json: key 'target_new' appears twice in one object; keep one",
                "r.jsonl": r"r.jsonl record 1 \(line 2\): key 'target_new' appears twice in one object; keep one",
                "r.csv": "r.csv: column 'target_new' appears twice in the header row; keep one"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(MemitError, match=messages[name]):
            load_requests(tmp_path / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "prompt": "c"}\n')
    with pytest.raises(MemitError, match=f"--unrelated {prompts} line 2: key 'prompt' appears twice"):
        read_prompts(prompts, "--unrelated")
    (tmp_path / "nested.json").write_text('[{"requested_rewrite": {"prompt": "{} x", "subject": "s", '
                                          '"target_new": {"str": "a", "str": "b"}, "target_true": {"str": "c"}}}]')
    with pytest.raises(MemitError, match="key 'str' appears twice"):
        load_requests(tmp_path / "nested.json")


@pytest.mark.parametrize("case_id, expected", [(7, "7"), ("cf-7", "cf-7"), ([1, 2], None), ({"a": 1}, None),
                                               (True, None)])
def test_case_id_is_a_number_or_a_string(case_id, expected):
    """A list became its Python spelling "[1, 2]" in the patch header's requests."""
    rec = {"prompt": "{} x", "subject": "s", "target_new": "t", "case_id": case_id}
    if expected is None:
        with pytest.raises(MemitError, match="r.json record 0: case_id must be a number or a string"):
            parse_record(rec, "r.json record 0")
    else:
        assert parse_record(rec, "r.json record 0").case_id == expected


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "directory", "missing"])
def test_prompt_files_that_are_not_regular_files_are_refused_unread(kind, tmp_path):
    """--preserve, eval --unrelated and ab --regression read prompts whole: /dev/zero or a FIFO would
    never end, so only a regular file is read."""
    import os

    path = {"/dev/zero": "/dev/zero", "fifo": tmp_path / "fifo", "directory": tmp_path,
            "missing": tmp_path / "no"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    for flag in ("--preserve", "--unrelated", "--regression"):
        with pytest.raises(MemitError, match=f"^{flag} {path} does not exist \\(or is not a regular file\\)$"):
            read_prompts(path, flag)


def test_subject_files_are_text_lines_or_json(tmp_path):
    f = tmp_path / "subjects"
    for text in ("Paris\n\n  Danielle Darrieux \n", '["Paris", "Danielle Darrieux"]', '"Paris"\n"Danielle Darrieux"\n'):
        f.write_text(text)
        assert read_subjects(f, "--neighbour-subjects") == ["Paris", "Danielle Darrieux"]
    for text, message in (("[1, 2]", "expected subject names"), ("", "holds no subjects"),
                          ('{"a": 1}', "expected subject names")):
        f.write_text(text)
        with pytest.raises(MemitError, match=f"--neighbour-subjects {f}: {message}|--neighbour-subjects {f} {message}"):
            read_subjects(f, "--neighbour-subjects")


def test_eval_reader_uses_the_same_records(tmp_path, data_dir):
    fmt, records = read_dataset(data_dir / "counterfact" / "counterfact_edit_10k.json", n=3)
    assert fmt == "counterfact-edit" and len(records) == 3
    assert all(r.rewrite_prompt.count(r.subject) >= 1 and r.paraphrase_prompts for r in records)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "s x", "subject": "s", "target_new": "a", "ground_truth": "b",
                                "rephrase_prompt": "y", "locality_prompt": "z"}]))
    with pytest.raises(MemitError, match="record 0: missing field 'locality_ground_truth'"):
        read_dataset(bad)


def test_fact_text_reads_header_records_and_foreign_ones():
    assert fact_text(EditRequest("{} is in", "Rome", " Italy", " France").to_dict()) == \
        "Rome is in -> Italy (was: France)"
    assert fact_text({"weird": 1}) == '{"weird": 1}'


# -- files -----------------------------------------------------------------------------------------------
def test_atomic_file_keeps_the_umask_mode_and_leaves_nothing_on_failure(tmp_path):
    (tmp_path / "plain").touch()  # what a plain open() and mkdir give under this process's umask
    (tmp_path / "plain_dir").mkdir()
    plain, plain_dir = (stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("plain", "plain_dir"))
    (tmp_path / "plain").unlink()
    (tmp_path / "plain_dir").rmdir()
    with atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == plain
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "b.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("y")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == plain_dir and (tmp_path / "d" / "f").read_text() == "y"
    with pytest.raises(MemitError, match="already exists"), atomic_dir(tmp_path / "d"):
        pass
    with pytest.raises(MemitError, match="is a directory"), atomic_file(tmp_path / "d"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]


def test_token_conventions(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    assert pad_id(tok) == (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    ids = target_ids(tok, " Paris")
    assert ids and tok.bos_token_id not in ids[:1] and tok.decode(ids) == " Paris"


def test_without_conflicts_keeps_the_first_request_of_a_fact(tmp_path):
    rows = [{"prompt": "{} is in", "subject": "A", "target_new": "x"},
            {"prompt": "{} is in", "subject": "A", "target_new": "y"},  # asks the same fact for another target
            {"prompt": "{} is in", "subject": "A", "target_new": "x"},  # the same edit again: kept
            {"prompt": "{} is in", "subject": "B", "target_new": "z"}]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rows))
    kept, dropped = without_conflicts(path, 2)
    assert kept == [rows[0], rows[2]] and dropped == 1
    assert without_conflicts(path)[0] == [rows[0], rows[2], rows[3]]


def test_a_damaged_checkpoint_is_one_clear_error(smollm2, tmp_path):
    from memit_vllm.checkpoint import Checkpoint

    data = (smollm2 / "model.safetensors").read_bytes()
    (tmp_path / "config.json").write_text((smollm2 / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(MemitError, match="model.safetensors cannot be read as safetensors.*truncated"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(MemitError, match="is not a safetensors index"):
        Checkpoint(tmp_path)


def test_stray_braces_in_a_prompt_are_one_clear_error():
    with pytest.raises(MemitError, match=r"holds braces besides the one '\{\}'.*double them"):
        parse_record({"prompt": "{} is {x}", "subject": "s", "target_new": "t"}, "r")
    assert parse_record({"prompt": "{} is {{x}}", "subject": "s", "target_new": "t"}, "r").text() == "s is {x}"
