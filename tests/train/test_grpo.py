"""GRPO (train/grpo.py, train/rewards.py, train/arithmetic.py): the rewards and their errors, the group
advantages, the drawn task, and the loop on a tiny random Llama: it writes an adapter with every reward part
logged and the held-out numbers, and a run interrupted and resumed gives the uninterrupted run's weights."""

from __future__ import annotations

import json

import pytest
import torch
from ft_helpers import write_jsonl
from rich.console import Console
from safetensors.torch import load_file

from vishwamai_edge.errors import RecipeError
from vishwamai_edge.recipe import RewardSpec
from vishwamai_edge.train import finetune as F
from vishwamai_edge.train.arithmetic import draw, write_arithmetic
from vishwamai_edge.train.grpo import advantages, grpo
from vishwamai_edge.train.rewards import RewardError, build_rewards, is_right

QUIET = Console(stderr=True, quiet=True)


def reward(tmp_path, **spec):
    (r,) = build_rewards([RewardSpec(**spec)], tmp_path)
    return r


def test_the_answer_reward_and_its_format_bonus(tmp_path):
    r = reward(tmp_path, kind="answer", format_bonus=0.5)
    ex = {"answer": "75"}
    assert r("75", ex, "x") == 1.5  # right and alone: the bonus
    assert r("27 + 48 = 75.", ex, "x") == 1.0  # right, with working: no bonus
    assert r("75 or 76", ex, "x") == 0.0  # the final number is what counts
    assert r("76", ex, "x") == 0.0 and r("no idea", ex, "x") == 0.0  # wrong: no bonus for the bare format
    assert r("Paris.", {"answer": "paris"}, "x") == 1.5  # not a number: the normalized text, alone
    assert is_right("-3", "-3") and is_right("it is 2.50", "2.5")


def test_the_other_built_in_rewards(tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    js = reward(tmp_path, kind="json_schema", schema=schema, weight=2.0)
    assert js('{"n": 3}', {}, "x") == 1.0 and js('{"n": "3"}', {}, "x") == 0.0 and js("{", {}, "x") == 0.0
    assert js.weight == 2.0
    per_example = reward(tmp_path, kind="json_schema")
    assert per_example('{"n": 3}', {"schema": schema}, "x") == 1.0
    rx = reward(tmp_path, kind="regex", pattern=r"^\d+$")
    assert rx("42", {}, "x") == 1.0 and rx("42 apples", {}, "x") == 0.0
    ln = reward(tmp_path, kind="length", target=10)
    assert ln("short", {}, "x") == 0.0 and ln("x" * 25, {}, "x") == -1.5


def test_a_reward_of_the_users_own(tmp_path):
    (tmp_path / "mine.py").write_text(
        "def exact(completion, example):\n    return float(completion.strip() == example['answer'])\n"
        "def broken(completion, example):\n    return example['missing']\n"
        "def wordy(completion, example):\n    return 'yes'\n")
    mine = reward(tmp_path, kind="python", file="mine.py", function="exact")
    assert mine(" 7 ", {"answer": "7"}, "x") == 1.0 and mine.name == "exact"
    with pytest.raises(RewardError, match=r"reward 'broken' raised KeyError \('missing'\) on data.jsonl:3"):
        reward(tmp_path, kind="python", file="mine.py", function="broken")("7", {}, "data.jsonl:3")
    with pytest.raises(RewardError, match="reward 'wordy' returned 'yes' on data.jsonl:4; a reward is a finite"):
        reward(tmp_path, kind="python", file="mine.py", function="wordy")("7", {}, "data.jsonl:4")
    with pytest.raises(RecipeError, match="no function 'absent'"):
        reward(tmp_path, kind="python", file="mine.py", function="absent")
    with pytest.raises(RecipeError, match="nothere.py: no such file"):
        reward(tmp_path, kind="python", file="nothere.py", function="exact")


@pytest.mark.parametrize("spec, message", [
    ({"kind": "regex"}, "pattern: required"),
    ({"kind": "regex", "pattern": "("}, "not a regular expression"),
    ({"kind": "python", "file": "r.py"}, "function: required"),
    ({"kind": "answer", "target": 5}, "target: only for a reward of kind 'length'"),
    ({"kind": "sentiment"}, "kind"),
])
def test_reward_specs_are_checked(spec, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        RewardSpec(**spec)


def test_advantages_are_relative_to_the_group():
    adv = advantages([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0], group=4)
    assert adv[0] == pytest.approx(3 ** 0.5, rel=1e-3) and adv[1] == pytest.approx(-(3 ** -0.5), rel=1e-3)
    assert adv[4:] == [0.0] * 4  # a group that scores alike teaches nothing


def test_the_arithmetic_task_is_drawn_from_its_seed(tmp_path):
    train, held_out = draw(300, 50, seed=3)
    assert (train, held_out) == draw(300, 50, seed=3) and draw(300, 50, seed=4) != (train, held_out)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    for row in train + held_out:
        expr = row["prompt"].removeprefix("What is ").split("?")[0]
        assert str(eval(expr)) == row["answer"]  # noqa: S307  the task's own arithmetic
    files = write_arithmetic(tmp_path, 20, 5, seed=0)
    tasks = [json.loads(line) for line in files.tasks.read_text().splitlines()]
    assert len(tasks) == 5 and all(t["match"] == "number" for t in tasks)


# -- the loop on a tiny model --------------------------------------------------------------
@pytest.fixture
def prompts(tmp_path):
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(2, 8) for b in range(3, 6)]
    return write_jsonl(tmp_path / "sums.jsonl", rows)


def grpo_recipe(make_recipe, hf, prompts, grpo=None, **kw):
    """A random model is never right: the length reward is what varies within a group, so it learns."""
    g = {"num_generations": 4, "max_completion_tokens": 6, "eval_max": 4,
         "rewards": [{"kind": "answer", "format_bonus": 0.1}, {"kind": "length", "target": 4, "weight": 0.1}],
         **(grpo or {})}
    spec = dict(method="grpo", steps=4, batch_size=2, micro_batch_size=4, lr=5e-3, save_every=2, grpo=g,
                dataset={"train": str(prompts), "eval": str(prompts)})
    return make_recipe(hf, prompts, **{**spec, **kw})


def run(recipe, hf, out, **kw):
    return grpo(recipe, hf, out, F.run_fingerprint(recipe, "tiny", out), console=QUIET, **kw)


def test_grpo_writes_an_adapter_with_every_reward_part_logged(tiny_model, make_recipe, prompts, tmp_path):
    hf = tiny_model("llama")
    result = run(grpo_recipe(make_recipe, hf, prompts), hf, tmp_path / "g")
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    for h in result.history:
        assert {"reward", "reward_answer", "reward_length", "right", "loss", "completion_tokens"} <= set(h)
        assert h["reward"] == pytest.approx(h["reward_answer"] + h["reward_length"], abs=2e-4)
    assert set(result.held_out) == {"before", "after"} and result.held_out["before"]["prompts"] == 4
    saved = json.loads((tmp_path / "g/adapter/training.json").read_text())
    assert saved["method"] == "grpo" and saved["held_out"]["after"]["accuracy"] is not None
    assert not (tmp_path / "g/checkpoints").exists()


def test_an_interrupted_grpo_run_resumes_to_the_same_weights(tiny_model, make_recipe, prompts, tmp_path):
    """Sampling, rewards and updates of each step are functions of (seed, step): resumed at step 2, the
    run's weights equal the uninterrupted run's. With beta and two iterations, the reference pass and the
    clipped ratio are on the resumed path too."""
    hf = tiny_model("llama")
    recipe = grpo_recipe(make_recipe, hf, prompts, grpo={"beta": 0.05, "iterations": 2, "eval_max": 2})
    full = run(recipe, hf, tmp_path / "full")

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(recipe, hf, tmp_path / "cut", on_step=interrupt)
    resumed = run(recipe, hf, tmp_path / "cut", resume=True)
    assert resumed.resumed_from == 2 and [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert all("kl" in h for h in resumed.history)
    a = load_file(tmp_path / "full/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "cut/adapter/adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert any(v.abs().max().item() > 0 for k, v in a.items() if "lora_B" in k)  # it did train
    assert torch.equal(torch.tensor([h["reward"] for h in full.history]),
                       torch.tensor([h["reward"] for h in resumed.history]))


def test_bad_prompts_and_rewards_fail_in_one_line(tiny_model, make_recipe, prompts, tmp_path):
    from vishwamai_edge.train.data import DatasetError

    hf = tiny_model("llama")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "What is 2 + 3?", "answer": "5"}, {"question": "x"}])
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: prompt is a non-empty string"):
        run(grpo_recipe(make_recipe, hf, prompts, dataset={"train": str(bad), "eval": str(prompts)}), hf,
            tmp_path / "a")
    no_answer = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hi?"}] * 4)
    with pytest.raises(Exception, match=r"reward 'answer' raised KeyError .*q.jsonl:\d"):
        run(grpo_recipe(make_recipe, hf, prompts, dataset={"train": str(no_answer), "eval": str(prompts)}), hf,
            tmp_path / "b")


def test_completion_log_probabilities_equal_one_sequence_at_a_time(tiny_model):
    """Padded together (prompts to the left, completions to the right, logits for the completions only), each
    completion token's log-probability is the one the model gives its sequence alone."""
    from transformers import AutoModelForCausalLM

    from vishwamai_edge.train.grpo import token_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()
    seqs = [([5, 6, 7, 8, 9], [10, 11]), ([5, 6], [12, 13, 14, 15]), ([7, 8, 9], [16])]
    with torch.no_grad():
        logp, mask = token_logps(model, seqs, pad_id=0, temperature=0.7, device="cpu")
        for row, (p, c) in enumerate(seqs):
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:len(p) + len(c) - 1] / 0.7
            alone = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1)
            assert torch.allclose(logp[row, :len(c)], alone, atol=1e-5)
            assert mask[row].tolist() == [1.0] * len(c) + [0.0] * (4 - len(c))
