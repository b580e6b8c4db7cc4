"""`vishwamai-edge finetune` and its user errors: one line naming the file and line or field, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from ft_helpers import chat_rows, write_jsonl

CLI = [sys.executable, "-m", "vishwamai_edge.cli"]


def run(*args, timeout=600):
    return subprocess.run([*CLI, *map(str, args)], check=False, capture_output=True, text=True, timeout=timeout)


def recipe_file(tmp_path, hf_dir, train, **finetune):
    spec = {"dataset": {"train": str(train)}, "lora": {"r": 4, "alpha": 8}, "steps": 2, "batch_size": 4,
            "micro_batch_size": 2, "max_seq_len": 64, "lr": 1e-2, "merge": {"prompts": ["Hi"], "tolerance": 0.05}}
    spec.update(finetune)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "source": {"kind": "hf", "path": str(hf_dir)}, "finetune": spec}))
    return path


def test_finetune_then_merge_and_rerun_is_up_to_date(tiny_model, chat_jsonl, tmp_path):
    recipe = recipe_file(tmp_path, tiny_model("llama"), chat_jsonl)
    first = run("finetune", "--recipe", recipe, "--out", tmp_path / "build")
    assert first.returncode == 0, first.stderr
    merged = tmp_path / "build/tiny/merged"
    assert first.stdout.strip() == str(merged)
    assert json.loads((merged / "merge_check.json").read_text())["max_abs_diff"] < 0.05
    training = json.loads((tmp_path / "build/tiny/finetune/adapter/training.json").read_text())
    assert training["steps"] == 2 and training["tokens_per_s"] > 0
    again = run("finetune", "--recipe", recipe, "--out", tmp_path / "build")
    assert again.returncode == 0 and "up to date" in again.stderr


@pytest.mark.parametrize(
    "case, expected",
    [
        ("not-json", "train.jsonl:3: not valid JSON"),
        ("no-messages", "train.jsonl:2: no 'messages' field"),
        ("empty", "train.jsonl has no examples (the file is empty)"),
        ("target", "tiny.yaml: finetune.lora.target_modules.0: this llama model has no layer 'query_key_value'"),
        ("qlora", "finetune.method qlora needs a CUDA GPU"),
        ("batch", "tiny.yaml: finetune: batch_size (4) must be a multiple of micro_batch_size (3)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_model, tmp_path, case, expected):
    rows = chat_rows()[:4]
    lines = {"not-json": [rows[0], rows[1], "{oops", rows[2]], "no-messages": [rows[0], {"prompt": "x"}],
             "empty": []}.get(case, rows)
    train = write_jsonl(tmp_path / "train.jsonl", lines)
    extra = {"target": {"lora": {"target_modules": ["query_key_value"]}}, "qlora": {"method": "qlora"},
             "batch": {"micro_batch_size": 3}}.get(case, {})
    if case == "qlora" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run("finetune", "--recipe", recipe_file(tmp_path, tiny_model("llama"), train, **extra),
               "--out", tmp_path / "build")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert expected in err and len(err.splitlines()) == 1, err


def test_recipe_without_finetune_section(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text("name: plain\n")
    proc = run("finetune", "--recipe", path)
    assert proc.returncode == 2 and "plain.yaml: has no finetune section" in proc.stderr


def test_method_flag_overrides_the_recipe(tiny_model, chat_jsonl, tmp_path):
    proc = run("finetune", "--recipe", recipe_file(tmp_path, tiny_model("llama"), chat_jsonl), "--method", "cpt",
               "--out", tmp_path / "build")
    assert proc.returncode == 2 and "--method cpt reads 'text' lines" in proc.stderr


@pytest.mark.slow
def test_two_processes_give_the_same_losses_as_one(tiny_model, chat_jsonl, tmp_path):
    """The DDP path of `accelerate launch` / torchrun, on the CPU (gloo): each process runs half of
    every step's examples; the losses equal the single-process run's."""
    recipe = recipe_file(tmp_path, tiny_model("llama"), chat_jsonl, steps=3, micro_batch_size=1)
    one = run("finetune", "--recipe", recipe, "--out", tmp_path / "one", "--no-merge")
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *CLI[1:], "finetune",
         "--recipe", str(recipe), "--out", str(tmp_path / "two"), "--no-merge"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr
    assert "2 process(es) on cpu" in two.stderr

    def losses(root):
        return [h["loss"] for h in json.loads((root / "tiny/finetune/adapter/training.json").read_text())["history"]]

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)


@pytest.mark.parametrize(
    "rewards, expected",
    [
        ([{"kind": "python", "file": "absent.py", "function": "f"}], "absent.py: no such file"),
        ([{"kind": "python", "file": "mine.py", "function": "missing"}], "mine.py has no function 'missing'"),
        ([{"kind": "python", "file": "mine.py", "function": "wordy"}],
         "reward 'wordy' returned 'many' on "),
        ([{"kind": "python", "file": "mine.py", "function": "broken"}],
         "reward 'broken' raised ZeroDivisionError (division by zero) on "),
        ([{"kind": "regex"}], "finetune.grpo.rewards.0: pattern: required for a reward of kind 'regex'"),
    ],
)
def test_grpo_reward_errors_are_one_line_and_exit_2(tiny_model, tmp_path, rewards, expected):
    (tmp_path / "mine.py").write_text("def wordy(completion, example):\n    return 'many'\n"
                                      "def broken(completion, example):\n    return 1 / 0\n")
    prompts = write_jsonl(tmp_path / "sums.jsonl", [{"prompt": f"What is {a} + 2?", "answer": str(a + 2)}
                                                    for a in range(8)])
    recipe = recipe_file(tmp_path, tiny_model("llama"), prompts, method="grpo", batch_size=2, micro_batch_size=4,
                         grpo={"num_generations": 2, "max_completion_tokens": 4, "rewards": rewards})
    proc = run("finetune", "--recipe", recipe, "--out", tmp_path / "build")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert expected in err and "Traceback" not in proc.stderr, proc.stderr


def test_prune_then_distill_from_the_command_line(tiny_model, tmp_path):
    """`finetune` on a recipe with a prune section: the student is cut, then distilled from the source (the
    default teacher) with every weight trained; the trained folder is the result, no merge."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(__import__("tiny_models").CORPUS * 6))
    recipe = recipe_file(tmp_path, tiny_model("llama"), text, method="distill", full=True, max_seq_len=32)
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**data, "prune": {"layers": 1, "calibration_tokens": 64}}))
    proc = run("finetune", "--recipe", recipe, "--out", tmp_path / "build")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "build/tiny/finetune/model")
    assert json.loads((tmp_path / "build/tiny/pruned/config.json").read_text())["num_hidden_layers"] == 1
    training = json.loads((tmp_path / "build/tiny/finetune/model/training.json").read_text())
    assert training["method"] == "distill" and training["objective"]["teacher"] == str(tiny_model("llama"))


@pytest.mark.parametrize("prune, distill, expected", [
    ({"layers": 5}, {}, "tiny.yaml: prune.layers: 5 is more than the model's 2 blocks"),
    ({"params": "10B"}, {}, "prune.params: 10,000,000,000 is not below the model's"),
    ({"layers": 1}, {"teacher": {"kind": "hf", "path": "qwen"}}, "has another vocabulary than the student"),
    ({"layers": 1}, {"teacher": {"kind": "hf", "path": "absent"}}, "tiny.yaml: finetune.distill.teacher: model folder"),
])
def test_prune_and_distill_errors_are_one_line_and_exit_2(tiny_model, tmp_path, prune, distill, expected):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(__import__("tiny_models").CORPUS * 6))
    if distill.get("teacher", {}).get("path") == "qwen":
        distill = {"teacher": {"kind": "hf", "path": str(tiny_model("qwen2"))}}
    recipe = recipe_file(tmp_path, tiny_model("llama"), text, method="distill", full=True, max_seq_len=32,
                         distill=distill)
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**data, "prune": {**prune, "calibration_tokens": 64}}))
    proc = run("finetune", "--recipe", recipe, "--out", tmp_path / "build")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert expected in err and "Traceback" not in proc.stderr, proc.stderr
