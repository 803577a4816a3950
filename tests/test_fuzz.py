"""Bad input found by machine: every reader of user input given generated inputs (hypothesis),
each checked against the invariant of tests/fuzz/targets.py (exit 0 with valid output, or exit 2
in one line naming the file, line or key; no traceback, no exit 1, nothing left behind).

Bounded for the suite: seeded (derandomized) and a fixed number of examples per reader, well
under a minute in all. ``python tests/fuzz/run.py`` runs the same tests with many more, random,
examples; see the README's failure section."""

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megalign.platform.releases import megatron_core_at_least

from conftest import CORPUS, INSTRUCTIONS, TOKENIZER
from fuzz import strategies as gen
from fuzz import targets

# MEGALIGN_FUZZ_SCALE=N: N times the examples, drawn at random (tests/fuzz/run.py sets it)
SCALE = int(os.environ.get("MEGALIGN_FUZZ_SCALE", "1"))


def budget(examples: int):
    return settings(max_examples=examples * SCALE, derandomize=SCALE == 1, deadline=None,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


SAMPLES = gen.corpus_sample(str(CORPUS))


# ----------------------------------------------------------------------------- corpora


@budget(60)
@given(texts=gen.documents)
def test_jsonl_documents_are_tokenized_exactly_or_refused_by_line(workdir, texts):
    targets.preprocess_documents(workdir, texts)


@budget(6)
@given(texts=gen.documents)
def test_jsonl_documents_through_the_worker_pool(workdir, texts):
    targets.preprocess_documents(workdir, texts, workers=2)


@budget(80)
@given(data=st.data(), name=st.sampled_from(sorted(SAMPLES)),
       extra=st.sampled_from([[], ["--append-eod"], ["--skip-bad"], ["--json-keys", "text", "x"]]))
def test_damaged_corpus_files(workdir, data, name, extra):
    targets.preprocess(workdir, data.draw(gen.damaged(SAMPLES[name])), name, extra)


@budget(40)
@given(records=st.lists(st.one_of(
    gen.json_values,
    st.fixed_dictionaries({"prompt": gen.json_values, "response": gen.json_values}),
    st.fixed_dictionaries({"prompt": gen.any_text, "response": gen.any_text})), min_size=1,
    max_size=4))
def test_sft_prompt_response_records(workdir, records):
    targets.preprocess_sft(workdir, records, "prompt:response")


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory) -> Path:
    from conftest import chat_tokenizer

    return chat_tokenizer(tmp_path_factory.mktemp("chat"))[1]


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                 "content": st.one_of(gen.any_text, gen.json_values)})


@budget(20)
@given(records=st.lists(st.one_of(
    gen.json_values, st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=4)}),
    st.fixed_dictionaries({"messages": gen.json_values})), min_size=1, max_size=3))
def test_sft_chat_records(workdir, chat_tokenizer, records):
    targets.preprocess_sft(workdir, records, "messages", tokenizer=chat_tokenizer)


def test_instruction_corpus_still_reads(workdir):
    """The generators' control: the bundled instruction set passes the same target."""
    with gzip.open(INSTRUCTIONS, "rt", encoding="utf-8") as handle:
        records = [json.loads(next(handle)) for _ in range(5)]
    assert targets.preprocess_sft(workdir, records, "prompt:response").code == 0


# ----------------------------------------------------------------------------- tokenizers


@budget(25)
@given(data=st.data())
def test_damaged_sentencepiece_model(workdir, data):
    model = workdir / "tokenizer" / "damaged.model"
    model.parent.mkdir(exist_ok=True)
    model.write_bytes(data.draw(gen.damaged(TOKENIZER.read_bytes())))
    targets.preprocess(workdir, SAMPLES["corpus.jsonl"], extra=["--append-eod"], tokenizer=model)


@budget(25)
@given(content=st.one_of(gen.json_values.map(json.dumps),
                         st.fixed_dictionaries({"model": gen.json_values,
                                                "added_tokens": gen.json_values}).map(json.dumps),
                         st.text(max_size=30)))
def test_tokenizer_json_of_any_structure(workdir, content):
    directory = workdir / "hf_tokenizer"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    (directory / "tokenizer.json").write_text(content, encoding="utf-8", errors="surrogatepass")
    targets.preprocess(workdir, SAMPLES["corpus.jsonl"], tokenizer=directory / "tokenizer.json")


# ----------------------------------------------------------------------------- configs


@pytest.fixture(scope="module")
def base(corpus_prefix) -> dict:
    """What makes the tiny config a valid run of one process (a config file before the fuzzed
    one, so that the fuzzed one may change every key)."""
    return {"parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1},
            "data": {"global_batch_size": 2, "paths": [corpus_prefix],
                     "tokenizer": str(TOKENIZER), "eod_token": None}}


def test_base_config_is_valid(workdir, base):
    """The control: with nothing fuzzed, --check passes."""
    assert targets.train_check(workdir, b"", [], base).code == 0


@budget(80)
@given(tree=gen.config_trees())
def test_config_files_of_any_keys_and_values(workdir, base, tree):
    targets.train_check(workdir, gen.yaml_text(tree), [], base, targets.dotted_keys(tree))


@budget(40)
@given(data=st.data())
def test_damaged_config_files(workdir, base, data):
    targets.train_check(workdir, data.draw(gen.damaged(targets.TINY_CONFIG.read_bytes())), [],
                        base, gen.KEYS)


@budget(60)
@given(overrides=gen.overrides)
def test_overrides_of_any_form(workdir, base, overrides):
    targets.train_check(workdir, b"", overrides, base)


# ----------------------------------------------------------------------------- checkpoints


def damage_config(tree: dict, key: str, value) -> dict:
    """``tree`` with the dotted ``key`` set to ``value`` (None: removed)."""
    tree = json.loads(json.dumps(tree))
    node, parts = tree, key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if value is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
    return tree


# the files of a checkpoint: Megatron-Core 0.19 keeps the common state in the .distcp files
CHECKPOINT_FILES = ["metadata.json", ".metadata", "__0_0.distcp"] + (
    [] if megatron_core_at_least("0.19.0") else ["common.pt"])
CHECKPOINT_DAMAGE = st.one_of(
    st.tuples(st.just("config"), st.sampled_from(gen.KEYS), st.one_of(st.none(), gen.scalars)),
    st.tuples(st.just("meta"), st.sampled_from(["config", "iteration", "ar_checkpoint"]),
              st.one_of(st.none(), gen.scalars, st.lists(gen.scalars, max_size=2))),
    st.tuples(st.just("file"), st.sampled_from(CHECKPOINT_FILES), st.integers(0, 2**16)),
    st.tuples(st.just("latest"), st.sampled_from(["", "..", "../..", "/", "iter_0000002",
                                                  "iter_0000001/..", "\x00"]), st.none()))


@budget(30)
@given(damage=CHECKPOINT_DAMAGE, command=st.sampled_from(targets.COMMANDS))
def test_damaged_checkpoint_metadata(workdir, ar_checkpoint, damage, command):
    damaged_checkpoint_outcome(workdir, ar_checkpoint, damage, command)


def damaged_checkpoint_outcome(workdir, ar_checkpoint, damage, command) -> targets.Outcome:
    """A command given a copy of ``ar_checkpoint`` with one kind of damage (checked)."""
    root = targets.copy_checkpoint(Path(ar_checkpoint), workdir)
    directory = root / Path(ar_checkpoint).name
    kind, what, value = damage
    if kind in ("config", "meta"):
        common = targets.load_common(directory)
        meta = common["meta"]
        if kind == "config":
            meta["config"] = damage_config(meta["config"], what, value)
        elif value is None:
            meta.pop(what, None)
        else:
            meta[what] = value
        targets.save_common(directory, common)
    elif kind == "file":
        data = (directory / what).read_bytes()
        (directory / what).write_bytes(data[: value % max(len(data), 1)])
    else:
        (root / "latest").write_text(what, encoding="utf-8")
    return targets.open_checkpoint(workdir, root, command)


def test_undamaged_checkpoint_opens_in_every_command(workdir, ar_checkpoint):
    """The control: each command succeeds on the checkpoint the damage is applied to."""
    for command in targets.COMMANDS:
        root = targets.copy_checkpoint(Path(ar_checkpoint), workdir)
        assert targets.open_checkpoint(workdir, root, command).code == 0, command


# ----------------------------------------------------------------------------- HF directories


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    """A tiny random Llama (tied, GQA) as transformers saves it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hf") / "llama"
    LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True)).save_pretrained(directory)
    return directory


HF_KEYS = ["model_type", "architectures", "hidden_size", "intermediate_size",
           "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
           "max_position_embeddings", "rope_theta", "rope_scaling", "tie_word_embeddings",
           "head_dim", "rms_norm_eps", "hidden_act", "attention_bias", "mlp_bias",
           "torch_dtype", "dtype"]


@budget(25)
@given(data=st.data(), damage=st.one_of(
    st.tuples(st.just("config"), st.sampled_from(HF_KEYS), st.one_of(st.none(), gen.scalars)),
    st.tuples(st.just("bytes"), st.sampled_from(["config.json", "model.safetensors"]),
              st.none())))
def test_damaged_hugging_face_directory(workdir, hf_model, data, damage):
    source = workdir / "hf_input"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(hf_model, source)
    kind, name, value = damage
    if kind == "config":
        config = json.loads((source / "config.json").read_text())
        if value is None:
            config.pop(name, None)
        else:
            config[name] = value
        (source / "config.json").write_text(json.dumps(config))
    else:
        (source / name).write_bytes(data.draw(gen.damaged((source / name).read_bytes())))
    targets.convert_hf(workdir, source)


def test_undamaged_hugging_face_directory_converts(workdir, hf_model):
    """The control: the directory the damage is applied to converts."""
    assert targets.convert_hf(workdir, hf_model).code == 0


# ----------------------------------------------------------------------------- found by fuzzing
# One regression test per bug the generated inputs found (issue #31), through the same targets.


@pytest.mark.parametrize("config, fragment", [
    (b"1: 2\n", "config key 1 is not a name"),  # was a TypeError from difflib
    (b"model: {hidden_size: [\n", "line 2, column 1: not valid YAML"),  # was three lines
    (b"seed: \xff\n", "line 1: not UTF-8 text"),  # named no file
    (b"[" * 100_000, "nested too deeply"),  # was a RecursionError traceback
    (b"optimizer: {lr: .nan}\n", "optimizer.lr=nan is not a finite number"),
    (b"resilience: {failure_timeout_s: 1e999}\n", "is not a finite number"),
    (b"seed: 99999999999999999999999\n", "too large for a 64-bit integer"),
    (b"seed: -5\n", "seed=-5 must lie in 0..4294967295"),  # numpy's shuffle failed in training
    (b"align: {layers: [a]}\n", "align.layers[0]: expected int"),
    (b"optimizer: {freeze: [1]}\n", "optimizer.freeze[0]: expected str"),
    (b"data: {paths: [1, 2]}\n", "data.paths=[1, 2]: give prefixes only"),
    (b"evaluation: {ood_paths: [{}]}\n", "evaluation.ood_paths=[{}]"),
    (b"data: {paths: [/nonexistent/x]}\n", "/nonexistent/x.idx' does not exist"),  # --check
])
def test_config_bugs_found_by_fuzzing(workdir, base, config, fragment):
    outcome = targets.train_check(workdir, config, [], base, gen.KEYS + ["1"])
    assert outcome.code == 2 and fragment in outcome.stderr, outcome.stderr


def test_a_run_names_a_missing_dataset_before_it_starts(tmp_path):
    """Without --check too: one line naming the file, exit 2, no run directory written (it was
    "error on rank N" from inside dataset building)."""
    from megalign.cli.train import main

    run_dir = tmp_path / "run"
    outcome = targets.run_main(main, ["--config", str(targets.TINY_CONFIG),
                                      "data.paths=[/nonexistent/x]",
                                      "data.global_batch_size=2", f"data.tokenizer={TOKENIZER}",
                                      "parallel.tensor_model_parallel_size=1",
                                      "parallel.pipeline_model_parallel_size=1",
                                      f"logging.run_dir={run_dir}"])
    targets.check(outcome, "megalign-train", ["/nonexistent/x"])
    assert outcome.code == 2 and "/nonexistent/x.idx' does not exist" in outcome.stderr
    assert not run_dir.exists()


def test_usage_errors_are_one_line_in_every_command(workdir):
    """argparse's usage errors were two lines (usage, then the error) in all but two commands."""
    from megalign.cli import convert, evaluate, generate, harness, plan, train

    for module, prog in ((train, "megalign-train"), (convert, "megalign-convert"),
                         (evaluate, "megalign-eval"), (generate, "megalign-generate"),
                         (harness, "megalign-harness"), (plan, "megalign-plan")):
        outcome = targets.run_main(module.main, ["--frobnicate"])
        targets.check(outcome, prog)
        assert outcome.code == 2 and "(see --help)" in outcome.stderr, prog


@pytest.mark.parametrize("data, fragment", [
    (b'{"text": ' + b"[" * 100_000 + b"]}\n", "corpus.jsonl:1: JSON nested too deeply"),  # exit 1
    (b"\xef\xbb\xbf" + b'{"text": "In the beginning"}\n', None),  # a BOM was malformed JSON
])
def test_corpus_bugs_found_by_fuzzing(workdir, data, fragment):
    outcome = targets.preprocess(workdir, data, extra=["--append-eod"])
    assert (outcome.code, fragment is None or fragment in outcome.stderr) == (
        0 if fragment is None else 2, True), outcome.stderr


def test_text_files_with_crlf_line_ends_keep_no_carriage_return(workdir):
    from megalign.data.preprocess import load_tokenizer

    targets.preprocess(workdir, b"In the beginning\r\nGod created\r\n", "corpus.txt",
                       ["--append-eod"])
    tokenizer = load_tokenizer(str(TOKENIZER))
    assert targets.documents(str(workdir / "out" / "x_text_document")) == [
        tokenizer.encode(text) + [tokenizer.eod] for text in ("In the beginning", "God created")]


@pytest.mark.parametrize("damage, command, fragment", [
    (("meta", "config", False), "generate", "damaged metadata (['config'])"),  # AttributeError
    (("latest", "/", None), "generate", "names '/', not a checkpoint directory inside"),
    (("file", "metadata.json", 0), "generate", "metadata.json' is damaged"),  # a JSON error
    (("config", "data", None), "generate", "records no tokenizer"),  # "tokenizer ''"
    (("config", "seed", False), "convert", "records a config megalign cannot read"),
    (("meta", "iteration", ""), "convert", "damaged metadata (['iteration'])"),  # partial export
])
def test_checkpoint_bugs_found_by_fuzzing(workdir, ar_checkpoint, damage, command, fragment):
    outcome = damaged_checkpoint_outcome(workdir, ar_checkpoint, damage, command)
    assert outcome.code == 2 and fragment in outcome.stderr, outcome.stderr


@pytest.mark.skipif(megatron_core_at_least("0.19.0"), reason="0.19 reads both formats")
def test_a_checkpoint_in_megatron_core_019s_format_is_named_on_016(workdir, ar_checkpoint):
    """0.19 writes the common state inside the .distcp files (no common.pt), which 0.16 cannot
    read: said in one line instead of an AttributeError from inside dist_checkpointing."""
    root = targets.copy_checkpoint(Path(ar_checkpoint), workdir)
    (root / Path(ar_checkpoint).name / "common.pt").unlink()
    outcome = targets.open_checkpoint(workdir, root, "generate")
    assert outcome.code == 2, outcome.stderr
    assert "keeps its common state inside its .distcp files" in outcome.stderr, outcome.stderr


def test_a_trained_checkpoint_exports_without_a_recorded_vocabulary_size(workdir, ar_checkpoint):
    """A model trained from scratch (its vocabulary padded from the tokenizer, as objective=ar
    pretraining does) was refused: "records no padded vocabulary size"."""
    root = targets.copy_checkpoint(Path(ar_checkpoint), workdir)
    assert targets.open_checkpoint(workdir, root, "convert").code == 0
    from megalign.data.tokenizer import build_tokenizer

    config = json.loads((workdir / "output" / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 4096
    assert config["mask_token_id"] == build_tokenizer(str(TOKENIZER)).mask


@pytest.mark.parametrize("key, value, fragment", [
    ("intermediate_size", 2**40, "does not describe its weights"),  # allocated until OOM
    ("num_hidden_layers", 7, "describes 7 layers, its weights hold 2"),
    ("num_attention_heads", "x", "transformers cannot load it"),  # a TypeError traceback
])
def test_hugging_face_bugs_found_by_fuzzing(workdir, hf_model, key, value, fragment):
    source = workdir / "hf_input"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(hf_model, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, key: value}))
    outcome = targets.convert_hf(workdir, source)
    assert outcome.code == 2 and fragment in outcome.stderr, outcome.stderr


def test_untied_config_without_an_output_layer_is_refused(workdir, hf_model):
    """A config.json without tie_word_embeddings (transformers' default: untied) over tied
    weights converted with a random output layer, which transformers only logged."""
    source = workdir / "hf_input"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(hf_model, source)
    config = json.loads((source / "config.json").read_text())
    del config["tie_word_embeddings"]
    (source / "config.json").write_text(json.dumps(config))
    outcome = targets.convert_hf(workdir, source)
    assert outcome.code == 2 and "lacks weights its config.json asks for (['lm_head.weight'])" \
        in outcome.stderr, outcome.stderr


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory) -> Path:
    """``hf_model`` converted: a megalign checkpoint with its megalign.yaml."""
    output = tmp_path_factory.mktemp("converted")
    assert targets.convert_hf(output, hf_model).code == 0
    return output / "converted" / "model"


@budget(25)
@given(data=st.data())
def test_damaged_megalign_yaml_of_a_converted_model(workdir, base, converted, data):
    """megalign.yaml as megalign-convert wrote it, damaged, as the config a conversion run
    starts from (``--config DIR/megalign.yaml``)."""
    original = (converted / "megalign.yaml").read_bytes()
    model = workdir / "converted_copy"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(converted, model)
    targets.train_check(workdir, data.draw(gen.damaged(original)), [], base, gen.KEYS,
                        path=model / "megalign.yaml")
