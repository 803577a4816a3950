"""The lm-evaluation-harness adapter, offline, on local task files written here."""

import json

import pytest

from conftest import WORKERS, run_python

MC_TASK = """task: megalign_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

GEN_TASK = """task: megalign_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [".", "\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""


def write_tasks(root):
    mc = [{"question": "In the beginning God created the", "choices": [" heaven", " sea", " light"],
           "answer": 0},
          {"question": "And God said, Let there be", "choices": [" light", " water"], "answer": 0},
          {"question": "The LORD is my", "choices": [" king", " shepherd"], "answer": 1}]
    gen = [{"prompt": "And God saw the light, that it was", "answer": " good"},
           {"prompt": "In the beginning", "answer": " God"}]
    for name, rows, template in (("mc", mc, MC_TASK), ("gen", gen, GEN_TASK)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (root / f"{name}.yaml").write_text(template.format(data=data))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ar_checkpoint", "moe_checkpoint"])
def test_harness_offline(request, tmp_path, model, monkeypatch):
    """The adapter on the tiny dense model and on the tiny mixture of experts."""
    checkpoint = request.getfixturevalue(model)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                       "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "report.json"
    run_python([WORKERS / "harness_checks.py", "--checkpoint", checkpoint, "--tasks",
                "megalign_tiny_mc,megalign_tiny_gen", "--include_path", tasks, "--out", out])
    report = json.loads(out.read_text())
    first, second = report["runs"]
    assert 0 <= first["megalign_tiny_mc"]["acc,none"] <= 1
    assert 0 <= first["megalign_tiny_gen"]["exact_match,none"] <= 1
    assert first == second  # the same seeded masks and decoding in a fresh process state
    assert 0 < report["masked_fraction"] < 1
    assert report["loglikelihood"] < 0
    assert report["loglikelihood"] == pytest.approx(report["formula"], rel=1e-5)
    assert report["loglikelihood_second_in_list"] == report["loglikelihood"]
    free, stop, stopped = report["free"], report["stop"], report["stopped"]
    assert len(free) >= 4, free
    assert stopped == free[: free.index(stop)] and stop not in stopped
    assert "empty context" in report["empty_context_error"]
    assert report["default_decoding"] == [32, 32, 8]  # blocks of 8, one token per step
    assert report["fast_decoding"] == [0.5, True, True] and isinstance(report["fast_free"], str)


@pytest.mark.unit
def test_rolling_loglikelihood_is_refused_clearly():
    from megalign.harness import MegalignLM

    with pytest.raises(NotImplementedError, match="megalign-eval"):
        MegalignLM.loglikelihood_rolling(object(), [])
