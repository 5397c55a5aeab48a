"""Restore: Silver Bullet pairs on hand-checked arith cases, teachers (gold, a real model, a real
loopback endpoint), variants, the leakage guard, one-line errors, and DPO with LoRA on a tiny
random Llama quantized for real (RTN): adapter round trip, frozen base = quantized checkpoint,
atomic save under ENOSPC, the CLI.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from pytest_qmr import arith, models, restore  # noqa: E402
from pytest_qmr.cli import main  # noqa: E402
from pytest_qmr.locate.judges import JudgeConfig  # noqa: E402
from pytest_qmr.restore import (  # noqa: E402
    EndpointTeacher, GoldTeacher, LeakageError, ModelTeacher, PreferencePair, RestoreConfig, RestoreError,
    RestoreResult, TrainProblem,
)



@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One thread while this module trains (fast on a shared CPU); restored for the modules after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- fixtures & cases


@pytest.fixture(scope="module")
def base_path(cache_dir) -> Path:
    return models.resolve("embedded:smollm2-135m", cache_dir).path


@pytest.fixture(scope="module")
def tokenizer(base_path):
    return _tokenizer(base_path)


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


PROBLEMS = arith.generate("train", 12, 0)


def _by_ops(*ops: str) -> arith.ArithProblem:
    """The first train problem whose first operators are ``ops`` (deterministic)."""
    return next(p for p in arith.generate("train", 400, 0) if tuple(s.op for s in p.steps[:len(ops)]) == ops)


def _row(p: arith.ArithProblem, response: str, **extra) -> dict:
    """A case row as mine_traces writes it: Locate's verdict (arith labeller, rule judge) on ``response``."""
    row = {"id": p.id, "problem": p.question, "response": response, "gold_answer": str(p.answer),
           "solution": p.solution()}
    return {**restore.label_traces([row], [TrainProblem.from_arith(p)])[0], **extra}


def computational(p: arith.ArithProblem) -> str:
    """Step 1 right, step 2 off by one, answer follows the wrong value."""
    s = p.steps
    return f"{s[0].text(1)}\nStep 2: {s[1].a} {s[1].op} {s[1].b} = {s[1].result + 1}\nThe answer is {s[1].result + 1}."


def procedural(p: arith.ArithProblem) -> str:
    """Step 2 applies '-' where the gold adds (same operand): a method error."""
    s = p.steps
    assert s[1].op == "+"
    return f"{s[0].text(1)}\nStep 2: {s[1].a} - {s[1].b} = {s[1].a - s[1].b}\nThe answer is {s[1].a - s[1].b}."


# ----------------------------------------------------------------------------- pairs


def test_pair_cuts_before_first_faulty_step_with_gold_resume(tokenizer):
    p = PROBLEMS[0]
    response = computational(p)
    row = _row(p, response)
    verdict = (row["first_error_step"], row["primary_error_type"], row["category"])
    assert verdict == (2, "computational_error", "execution")
    [pair] = restore.build_pairs([row], GoldTeacher(), tokenizer=tokenizer)
    s = p.steps
    prefix = f"{s[0].text(1)}\n"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": arith.prompt(p.question)}], tokenize=False,
                                           add_generation_prompt=True)
    assert pair.prompt == prompt + prefix
    assert pair.prompt.endswith("<|im_start|>assistant\n" + prefix)
    assert pair.rejected == response[len(prefix):]  # the model's own text, verbatim
    assert pair.chosen == "\n".join(st.text(i) for i, st in enumerate(s[1:], 2)) + f"\nThe answer is {p.answer}."
    assert (pair.item_id, pair.error_type, pair.category, pair.first_step, pair.teacher, pair.variant) == (
        p.id, "computational_error", "execution", 2, "gold", "all-step")
    assert PreferencePair.from_dict(json.loads(json.dumps(pair.to_dict()))) == pair


def test_step_scope_rejects_only_the_faulty_step(tokenizer):
    """rejected_scope="step": the answer line that follows the wrong value is not pushed down;
    the prompt and chosen are those of the default scope, and an unknown scope is one line."""
    p = PROBLEMS[0]
    response = computational(p)
    [rest] = restore.build_pairs([_row(p, response)], GoldTeacher(), tokenizer=tokenizer)
    [step] = restore.build_pairs([_row(p, response)], GoldTeacher(), tokenizer=tokenizer, rejected_scope="step")
    s = p.steps
    assert step.rejected == f"Step 2: {s[1].a} {s[1].op} {s[1].b} = {s[1].result + 1}"
    assert rest.rejected == step.rejected + f"\nThe answer is {s[1].result + 1}."
    assert (step.prompt, step.chosen) == (rest.prompt, rest.chosen)
    with pytest.raises(RestoreError, match="rejected_scope must be one of rest, step, got 'all'"):
        restore.build_pairs([_row(p, response)], GoldTeacher(), tokenizer=tokenizer, rejected_scope="all")


def test_step_scope_keeps_a_bare_answer_line_and_leaves_no_resume_rows_whole(tokenizer):
    p = next(q for q in PROBLEMS if len(q.steps) >= 3)
    s = p.steps
    early = f"{s[0].text(1)}\n{s[1].text(2)}\nThe answer is {s[1].result}."
    [pair] = restore.build_pairs([_row(p, early)], GoldTeacher(), tokenizer=tokenizer, rejected_scope="step")
    assert pair.rejected == f"The answer is {s[1].result}."
    [whole] = restore.build_pairs([_row(p, early)], GoldTeacher(), "all-ns", tokenizer=tokenizer,
                                  rejected_scope="step")
    assert whole.rejected == early


def test_rows_with_chat_formatted_problem_need_no_tokenizer(tokenizer):
    """Regression rows built from SampleRecords carry the rendered prompt as ``problem``."""
    p = PROBLEMS[0]
    rendered = restore.chat_prompt(tokenizer, arith.prompt(p.question))
    row = _row(p, computational(p), problem=rendered)
    [pair] = restore.build_pairs([row], GoldTeacher())
    assert pair.prompt.startswith(rendered)
    with pytest.raises(RestoreError, match="not chat-formatted"):
        restore.build_pairs([_row(p, computational(p))], GoldTeacher())


def test_missing_last_step_resumes_after_the_last_written_step(tokenizer):
    """Answering after step 2 of a 3+ step problem: the cut is the answer line, gold resumes at step 3."""
    p = next(q for q in PROBLEMS if len(q.steps) >= 3)
    s = p.steps
    response = f"{s[0].text(1)}\n{s[1].text(2)}\nThe answer is {s[1].result}."
    [pair] = restore.build_pairs([_row(p, response)], GoldTeacher(), tokenizer=tokenizer)
    assert pair.first_step == 3 and pair.rejected == f"The answer is {s[1].result}."
    assert pair.chosen.startswith(f"Step 3: {s[2].a} {s[2].op} {s[2].b} = {s[2].result}\n")


def test_chosen_dropped_when_teacher_answer_is_wrong(tokenizer):
    good, bad = PROBLEMS[0], PROBLEMS[1]
    rows = [_row(good, computational(good)), _row(bad, computational(bad))]
    wrong = bad.solution().replace(f"The answer is {bad.answer}.", f"The answer is {bad.answer + 7}.")
    pairs = restore.build_pairs(rows, GoldTeacher({bad.id: wrong}), tokenizer=tokenizer)
    assert [x.item_id for x in pairs] == [good.id]
    with pytest.raises(RestoreError, match="teacher gold gave no continuation whose final answer verifies"):
        restore.build_pairs(rows[1:], GoldTeacher({bad.id: wrong}), tokenizer=tokenizer)


def test_variants_filter_by_category(tokenizer):
    ex, me = PROBLEMS[0], _by_ops(PROBLEMS[0].steps[0].op, "+")
    rows = [_row(ex, computational(ex)), _row(me, procedural(me))]
    assert rows[1]["category"] == "method", rows[1]["explanation"]
    ids = lambda v: [x.item_id for x in restore.build_pairs(rows, GoldTeacher(), v, tokenizer=tokenizer)]  # noqa: E731
    assert ids("all-step") == [ex.id, me.id]
    assert ids("ee-step") == [ex.id]
    assert ids("me-step") == [me.id]
    with pytest.raises(RestoreError, match=r"^nothing to restore: .* in category conceptual \(variant ce-step\)$"):
        restore.build_pairs(rows, GoldTeacher(), "ce-step", tokenizer=tokenizer)


def test_no_resume_variants(tokenizer):
    p = PROBLEMS[0]
    response = computational(p)
    [pair] = restore.build_pairs([_row(p, response)], GoldTeacher(), "all-ns", tokenizer=tokenizer)
    assert pair.prompt == restore.chat_prompt(tokenizer, arith.prompt(p.question))
    assert (pair.chosen, pair.rejected, pair.first_step) == (p.solution(), response, 1)

    pool = [_row(q, computational(q)) for q in PROBLEMS[:6]]
    pool[0] = _row(PROBLEMS[0], PROBLEMS[0].solution())  # a correct response: rand-ns may draw it anyway
    for seed in range(4):  # the identical (correct) pair is skipped and another problem drawn instead
        a = restore.build_pairs(pool[:2], GoldTeacher(), "rand-ns", tokenizer=tokenizer, pool=pool, size=5, seed=seed)
        assert len({x.item_id for x in a}) == len(a) == 5 and PROBLEMS[0].id not in {x.item_id for x in a}
        assert all(x.first_step == 1 and x.variant == "rand-ns" and x.rejected != x.chosen for x in a)
    assert a == restore.build_pairs(pool[:2], GoldTeacher(), "rand-ns", tokenizer=tokenizer, pool=pool, size=5, seed=3)
    # default size: as many as the located cases (pool[1:3]: 2)
    assert len(restore.build_pairs(pool[1:3], GoldTeacher(), "rand-ns", tokenizer=tokenizer, pool=pool)) == 2


def test_random_cut_resumes_at_a_seeded_step_no_later_than_the_fault(tokenizer):
    """rand-cut (the paper's random cut points): the same located cases as all-step, each cut at a
    step drawn from 1 to its first faulty step, so the prefix is the model's correct text and the
    gold resumes there; the draw is the seed's, and over seeds it is not always the fault."""
    problems = [q for q in arith.generate("train", 60, 0) if len(q.steps) >= 4][:6]
    rows = []
    for q in problems:  # steps 1-3 right, step 4 off by one
        s = q.steps
        wrong = s[3].result + 1
        rows.append(_row(q, "\n".join(st.text(i) for i, st in enumerate(s[:3], 1))
                         + f"\nStep 4: {s[3].a} {s[3].op} {s[3].b} = {wrong}\nThe answer is {wrong}."))
    assert [r["first_error_step"] for r in rows] == [4] * len(rows)
    drawn = set()
    for seed in range(3):
        pairs = restore.build_pairs(rows, GoldTeacher(), "rand-cut", tokenizer=tokenizer, seed=seed)
        assert pairs == restore.build_pairs(rows, GoldTeacher(), "rand-cut", tokenizer=tokenizer, seed=seed)
        assert [x.item_id for x in pairs] == [q.id for q in problems]
        for q, x in zip(problems, pairs, strict=True):
            k = x.first_step
            assert 1 <= k <= 4 and x.variant == "rand-cut"
            prefix = "".join(f"{st.text(i)}\n" for i, st in enumerate(q.steps[:k - 1], 1))
            assert x.prompt.endswith("<|im_start|>assistant\n" + prefix)
            assert x.chosen.startswith(q.steps[k - 1].text(k)) and x.chosen.endswith(f"The answer is {q.answer}.")
            drawn.add(k)
    assert len(drawn) > 1 and drawn <= {1, 2, 3, 4}


def test_leakage_guard(tokenizer):
    with pytest.raises(LeakageError, match=r"^preference pairs overlap the evaluation items: b, c$"):
        restore.check_leakage(["a", "b", "c"], ["c", "b", "z"])
    restore.check_leakage(["a"], ["b"])
    p = PROBLEMS[0]
    with pytest.raises(LeakageError, match=p.id):
        restore.build_pairs([_row(p, computational(p))], GoldTeacher(), tokenizer=tokenizer, eval_ids=[p.id])
    t = arith.generate("test", 1, 0)[0]
    test_row = {**_row(p, computational(p)), "id": t.id}
    with pytest.raises(LeakageError, match="must come from a training split"):
        restore.build_pairs([test_row], GoldTeacher(), tokenizer=tokenizer)
    assert restore.build_pairs([test_row], GoldTeacher(), tokenizer=tokenizer, allow_test_split=True)


def test_gsm8k_train_vs_test_overlap_by_id(data_dir):
    train = restore.gsm8k_problems(data_dir, "train", 50, seed=0)
    test_ids = [p.id for p in restore.gsm8k_problems(data_dir, "test")]
    restore.check_leakage([p.id for p in train], test_ids)  # disjoint splits
    with pytest.raises(LeakageError, match=test_ids[3]):
        restore.check_leakage([p.id for p in train] + [test_ids[3]], test_ids)


def test_gsm8k_gold_steps_resume(data_dir):
    first = json.loads((data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[0])
    text = restore.gsm8k_solution(first["answer"])
    assert text == ("Step 1: Natalia sold 48/2 = 24 clips in May.\n"
                    "Step 2: Natalia sold 48+24 = 72 clips altogether in April and May.\nThe answer is 72.")
    gold = restore.GoldSolution.from_text(text)
    prefix = "Step 1: In May she sold 48 / 2 = 24 clips.\n"
    assert gold.continuation(prefix, 2) == ("Step 2: Natalia sold 48+24 = 72 clips altogether in April and May.\n"
                                            "The answer is 72.")


def test_empty_regression_set_is_one_line_error(tokenizer):
    p = PROBLEMS[0]
    with pytest.raises(RestoreError, match=r"^nothing to restore: none of 0 cases"):
        restore.build_pairs([], GoldTeacher(), tokenizer=tokenizer)
    solved = _row(p, p.solution())
    assert solved["first_error_step"] == -1
    escalated = {**_row(p, computational(p)), "status": "escalated"}  # not a final verdict
    with pytest.raises(RestoreError, match=r"^nothing to restore: none of 2 cases"):
        restore.build_pairs([solved, escalated], GoldTeacher(), tokenizer=tokenizer)


# ----------------------------------------------------------------------------- endpoint teacher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_down_is_one_line_error(tokenizer):
    p = PROBLEMS[0]
    config = JudgeConfig(name="down", base_url=f"http://127.0.0.1:{_free_port()}/v1", model="m", max_retries=1,
                         backoff=0.0, timeout=2)
    teacher = EndpointTeacher(config)
    with pytest.raises(RestoreError, match=r"^teacher endpoint:down is unreachable: connection to http://127"):
        restore.build_pairs([_row(p, computational(p))], teacher, tokenizer=tokenizer)
    teacher.close()


def test_endpoint_teacher_on_loopback_server(tokenizer, monkeypatch):
    """A real HTTP server on loopback answering chat completions: the key goes only in the header."""
    p = PROBLEMS[0]
    s = p.steps
    answer = "\n".join(st.text(i) for i, st in enumerate(s[1:], 2)) + f"\nThe answer is {p.answer}."
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"auth": self.headers.get("Authorization"), "body": body})
            data = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("QMR_TEST_TEACHER_KEY", "sk-secret-123")
    try:
        config = JudgeConfig(name="loop", base_url=f"http://127.0.0.1:{server.server_port}/v1", model="m",
                             api_key_env="QMR_TEST_TEACHER_KEY", max_retries=0)
        teacher = EndpointTeacher(config)
        [pair] = restore.build_pairs([_row(p, computational(p))], teacher, tokenizer=tokenizer)
        teacher.close()
    finally:
        server.shutdown()
        server.server_close()
    assert pair.teacher == "endpoint:loop" and pair.chosen == answer
    assert seen[0]["auth"] == "Bearer sk-secret-123"
    content = seen[0]["body"]["messages"][0]["content"]
    assert content.startswith(arith.prompt(p.question)) and content.endswith(f"{s[0].text(1)}\n")
    assert "sk-secret" not in json.dumps(pair.to_dict())


# ----------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, base_path, make_tiny_llama) -> dict:
    """A 2-layer random Llama (hidden 96) with the lab tokenizer, and its real RTN W4 dense copy."""
    from pytest_qmr.quantize import QuantSpec, quantize

    fp, _ = make_tiny_llama(tmp_path_factory.mktemp("tiny-fp"), base_path)
    q = quantize(fp, models.checkpoint_fingerprint(fp), QuantSpec(method="rtn", bits=4, group_size=32),
                 tmp_path_factory.mktemp("tiny-qcache"))
    return {"fp": fp, "quant": q.path, "work": tmp_path_factory.mktemp("restore")}


def _logits(model, text: str, tok) -> torch.Tensor:
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_model_teacher_failing_everywhere_is_one_line_error(tiny, tokenizer):
    rows = [_row(p, computational(p)) for p in PROBLEMS[:3]]
    teacher = ModelTeacher(tiny["fp"], max_new_tokens=6, progress=False)
    with pytest.raises(RestoreError, match=r"^teacher fp gave no continuation whose final answer verifies for any of 3"
                                           r" cases"):
        restore.build_pairs(rows, teacher, tokenizer=tokenizer)


def test_mining_is_the_cells_locate():
    """One Locate: a mined trace gets the verdict a cell's Locate gives with the same judges and
    policy, the suite's judges decide what is a case, and a collapsed format is a case at its step."""
    from pytest_qmr import locate

    p = _by_ops("+", "*")
    s = p.steps
    collapsed = f"{s[0].text(1)}\nStep 2: {s[1].a} * = {s[1].result}\nThe answer is {p.answer + 3}."
    rows = [{"id": p.id, "problem": p.question, "response": r, "gold_answer": str(p.answer),
             "solution": p.solution()} for r in (collapsed, computational(p), p.solution())]
    problem = TrainProblem.from_arith(p)
    # outside a cell: arith + rule on qmr_arith problems (one call per response: ids are unique in a call)
    mined = [restore.label_traces([row], [problem])[0] for row in rows]
    with locate.ensemble(["arith", "rule"]) as (judges, policy):
        located = [locate.locate([row], judges, policy)[0] for row in rows[:2]]
    verdict = ("first_error_step", "primary_error_type", "category", "status", "verdict_by")
    assert [tuple(m[k] for k in verdict) for m in mined[:2]] == [tuple(getattr(r, k) for k in verdict)
                                                                  for r in located]
    assert [tuple(m[k] for k in verdict) for m in mined] == [
        (2, None, None, "accepted", "arith"),  # the format collapses at step 2: no type, but the step is known
        (2, "computational_error", "execution", "accepted", "arith"),
        (-1, None, None, "accepted", None)]
    assert [m["correct"] for m in mined] == [False, False, True]
    assert [restore.is_case(m) for m in mined] == [True, True, False]
    # a suite whose locate.judges is [rule] sees no false equality in the collapse: escalated, no case
    (rule_only,) = restore.label_traces(rows[:1], [problem], judges=["rule"])
    assert rule_only["status"] == "escalated" and not restore.is_case(rule_only)
    # problems the arith judge does not know by default (another seed) are made known to it
    other = restore.arith_problems("train", 2, seed=7)
    wrong = [{"id": q.id, "problem": q.question, "response": computational(q.arith), "gold_answer": q.gold_answer,
              "solution": q.solution} for q in other]
    assert [r["verdict_by"] for r in restore.label_traces(wrong, other)] == ["arith", "arith"]


def test_mine_traces_labels_every_response(tiny):
    problems = restore.arith_problems("train", 3)
    rows = restore.mine_traces(tiny["quant"], problems, max_new_tokens=8, batch_size=2, progress=False)
    assert [r["id"] for r in rows] == [p.id for p in problems]
    for r, p in zip(rows, problems, strict=True):
        assert r["prompt"].endswith("<|im_start|>assistant\n") and p.question in r["prompt"]
        assert r["status"] == "accepted" and r["first_error_step"] >= 1 and not r["correct"]  # random weights


@pytest.fixture(scope="module")
def trained(tiny, tokenizer) -> dict:
    rows = [_row(p, computational(p)) for p in PROBLEMS[:4]]
    pairs = (restore.build_pairs(rows[:2], GoldTeacher(), tokenizer=tokenizer)  # rejected ends on its answer
             + restore.build_pairs(rows[2:], GoldTeacher(), tokenizer=tokenizer, rejected_scope="step"))
    config = RestoreConfig(max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0,
                           lora_r=4, lora_alpha=8, max_length=256, sft_weight=0.5)
    out = tiny["work"] / "adapter"
    card = restore.train_adapter(tiny["quant"], pairs, config, out)
    return {"pairs": pairs, "card": card, "out": out}


def test_dpo_trains_and_saves_adapter_with_card(trained):
    card, out = trained["card"], trained["out"]
    assert card["steps"] == 3 and card["pairs"] == 4 and len(card["losses"]) == 3
    assert card["cut_rejected_eos_dropped"] == 2  # the two step-scoped rejected continuations
    assert len(card["reward_accuracies"]) == 3 and card["config"]["beta"] == 0.1
    assert card["save_check_max_abs_diff"] <= 1e-5
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "qmr_card.json").read_text())["steps"] == 3
    assert not (out / "trainer").exists() and not list(out.parent.glob(".tmp-*"))
    lora = json.loads((out / "adapter_config.json").read_text())
    assert lora["r"] == 4 and {m.rsplit(".", 1)[-1] for m in lora["target_modules"]} >= {"q_proj", "down_proj"}


def test_adapter_round_trip_and_frozen_base_is_the_quantized_checkpoint(tiny, trained, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    text = trained["pairs"][0].prompt + trained["pairs"][0].chosen
    quant_model, _ = models.load(tiny["quant"])
    base_logits = _logits(quant_model, text, tokenizer)
    peft = PeftModel.from_pretrained(models.load(tiny["quant"])[0], str(trained["out"])).eval()
    with peft.disable_adapter():
        assert torch.equal(_logits(peft, text, tokenizer), base_logits)
    adapted = _logits(peft, text, tokenizer)
    assert not torch.allclose(adapted, base_logits, atol=1e-4)  # training moved the function

    merged, _ = restore.load_restored(tiny["quant"], trained["out"])
    torch.testing.assert_close(_logits(merged, text, tokenizer), adapted, atol=1e-4, rtol=1e-4)
    out = restore.merge_to_dir(tiny["quant"], trained["out"], tiny["work"] / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(plain, text, tokenizer), adapted, atol=1e-4, rtol=1e-4)


def _kl_to(teacher, student, text: str, tok) -> float:
    """Mean token KL(teacher ‖ student) over ``text``."""
    t, s = _logits(teacher, text, tok)[0], _logits(student, text, tok)[0]
    return float(torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                            reduction="batchmean"))


def test_distillation_pulls_the_adapter_toward_the_fp_model(tiny, trained, tokenizer):
    """distill_weight adds KL(FP ‖ policy) on the chosen rows: trained with it, and otherwise as
    ``trained``, the restored model ends closer to the FP model on those texts; the card logs the KL."""
    config = RestoreConfig(max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0,
                           lora_r=4, lora_alpha=8, max_length=256, sft_weight=0.5, distill_weight=50.0)
    out = tiny["work"] / "adapter-distilled"
    card = restore.train_adapter(tiny["quant"], trained["pairs"], config, out, distill_from=tiny["fp"])
    assert card["steps"] == 3 and len(card["distill_kl"]) == 3 and card["distill_from"] == str(tiny["fp"])
    assert trained["card"]["distill_from"] is None and trained["card"]["distill_kl"] == []
    fp_model = models.load(tiny["fp"])[0]
    distilled = restore.load_restored(tiny["quant"], out)[0]
    plain = restore.load_restored(tiny["quant"], trained["out"])[0]
    for pair in trained["pairs"]:
        text = pair.prompt + pair.chosen
        assert _kl_to(fp_model, distilled, text, tokenizer) < 0.5 * _kl_to(fp_model, plain, text, tokenizer)


def test_completion_only_scoring_gives_the_same_log_probs_from_fewer_rows(tiny, tokenizer, monkeypatch):
    """On CPU trl's fused LM head projects every position; inside ``scoring_completions_only`` it
    projects only the labelled ones (the DPO step's cost was mostly prompt positions) and the
    per-token log-probs it returns are the same."""
    from trl.trainer import utils as trl_utils

    from pytest_qmr.align import scoring_completions_only

    model = models.load(tiny["quant"])[0]
    trl_utils.add_fused_lm_head(model)
    pair = restore.build_pairs([_row(PROBLEMS[0], computational(PROBLEMS[0]))], GoldTeacher(),
                               tokenizer=tokenizer)[0]
    prompt_ids = tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + tokenizer(pair.chosen, add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[:, :len(prompt_ids)] = -100
    rows_scored: list[int] = []
    real_apply = trl_utils._ChunkedLogProbFunction.apply

    def counting_apply(hidden, *args):
        rows_scored.append(hidden.shape[0])
        return real_apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting_apply)
    with torch.no_grad():
        every = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        with scoring_completions_only():
            compact = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        after = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    n_completion = int((labels[:, 1:] != -100).sum())
    assert rows_scored == [ids.shape[1] - 1, n_completion, ids.shape[1] - 1]  # and restored on exit
    assert n_completion < len(prompt_ids)
    torch.testing.assert_close(compact, every, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, every)


def test_distillation_without_the_fp_model_is_one_line_error(tiny, trained):
    with pytest.raises(RestoreError, match=r"^distill_weight > 0 needs the full-precision model"):
        restore.train_adapter(tiny["quant"], trained["pairs"], RestoreConfig(distill_weight=1.0),
                              tiny["work"] / "never")
    assert not (tiny["work"] / "never").exists()
    with pytest.raises(RestoreError, match=r"^distill_weight must be >= 0, got -1.0$"):
        RestoreConfig(distill_weight=-1.0)


def test_out_of_disk_during_save_leaves_no_adapter(tiny, trained, monkeypatch):
    import peft.peft_model

    real = peft.peft_model.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as handle:  # half the file made it to disk, then the disk was full
            handle.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    config = RestoreConfig(max_steps=1, per_device_train_batch_size=2, lora_r=4, lora_alpha=8, max_length=256)
    fresh = tiny["work"] / "enospc"
    with pytest.raises(OSError) as info:
        restore.train_adapter(tiny["quant"], trained["pairs"], config, fresh)
    assert info.value.errno == errno.ENOSPC
    assert not fresh.exists() and not list(fresh.parent.glob(".tmp-enospc*"))
    # over an existing adapter: the old one survives whole
    before = (trained["out"] / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OSError):
        restore.train_adapter(tiny["quant"], trained["pairs"], config, trained["out"])
    assert (trained["out"] / "adapter_model.safetensors").read_bytes() == before
    assert not list(trained["out"].parent.glob(".tmp-adapter*"))


def test_cli_pairs_and_restore(tiny, tokenizer, tmp_path, capsys):
    rows = [_row(p, computational(p)) for p in PROBLEMS[:2]]
    judged = tmp_path / "judged.jsonl"
    judged.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs_file = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--judged", str(judged), "--teacher", "gold", "--model", str(tiny["quant"]),
                 "--out", str(pairs_file)]) == 0
    pairs = restore.read_pairs(pairs_file)
    assert [x.item_id for x in pairs] == [r["id"] for r in rows]
    assert main(["restore", "--model", str(tiny["quant"]), "--pairs", str(pairs_file), "--out",
                 str(tmp_path / "ad"), "--set", "max_steps=1", "--set", "per_device_train_batch_size=2",
                 "--set", "lora_r=2"]) == 0
    assert json.loads((tmp_path / "ad" / "qmr_card.json").read_text())["steps"] == 1
    assert main(["restore", "--model", str(tiny["quant"]), "--pairs", str(pairs_file), "--out",
                 str(tmp_path / "ad-kd"), "--distill-from", str(tiny["fp"]), "--set", "distill_weight=1",
                 "--set", "max_steps=1", "--set", "per_device_train_batch_size=2", "--set", "lora_r=2"]) == 0
    card = json.loads((tmp_path / "ad-kd" / "qmr_card.json").read_text())
    assert Path(card["distill_from"]) == Path(tiny["fp"]).resolve() and len(card["distill_kl"]) == 1
    capsys.readouterr()

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({**rows[0], "first_error_step": -1}) + "\n")
    assert main(["pairs", "--judged", str(empty), "--model", str(tiny["quant"]), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().startswith("qmr pairs: nothing to restore: none of 1 cases")
    assert main(["restore", "--model", str(tiny["quant"]), "--pairs", str(pairs_file), "--out",
                 str(tmp_path / "ad2"), "--set", "bogus=1"]) == 2
    assert "unknown setting" in capsys.readouterr().err


def test_restore_result_to_dict():
    r = RestoreResult(10, "gold", "all-step", 5, 1.5, "/a", fp_acc=0.5, quant_acc=0.1, restored_acc=0.3)
    d = r.to_dict()
    assert d["recovered"] == 0.5 and d["pairs"] == 10 and d["restored_acc"] == 0.3
    assert RestoreResult(1, "gold", "all-step", 1, 0.1, "/a").to_dict()["recovered"] is None


def test_config_losses_follow_installed_trl():
    """trl 1.16 has no rpo_alpha: NLL on chosen is its "sft" loss, mixed by loss_weights."""
    from trl import DPOConfig

    assert not hasattr(DPOConfig, "rpo_alpha")
    assert RestoreConfig().losses() == (["sigmoid"], None)
    assert RestoreConfig(sft_weight=0.2).losses() == (["sigmoid", "sft"], [1.0, 0.2])
    assert RestoreConfig(mode="sft").losses() == (["sft"], None)
    with pytest.raises(RestoreError):
        RestoreConfig(mode="ppo")


def test_hookspec_registers_as_firstresult():
    import pluggy

    from pytest_qmr import hooks

    pm = pluggy.PluginManager("pytest")
    pm.add_hookspecs(hooks)

    class Skip:
        @pluggy.HookimplMarker("pytest")
        def pytest_qmr_restore(self, cell, result, records):
            return None

    class Restores:  # an implementation written before the hook had `context` takes a subset
        @pluggy.HookimplMarker("pytest")
        def pytest_qmr_restore(self, cell, result, records):
            return RestoreResult(len(records), "gold", "all-step", 1, 0.1, "/a")

    class WithContext:
        @pluggy.HookimplMarker("pytest")
        def pytest_qmr_restore(self, records, context):
            return RestoreResult(len(records), "gold", "all-step", 1, 0.1, context) if context else None

    pm.register(Restores())
    pm.register(Skip())
    out = pm.hook.pytest_qmr_restore(cell=None, result=None, records=[{}, {}], context=None)
    assert isinstance(out, RestoreResult) and out.pairs == 2
    pm.register(WithContext())
    out = pm.hook.pytest_qmr_restore(cell=None, result=None, records=[{}], context="/ctx")
    assert out.adapter_path == "/ctx" and out.pairs == 1


def test_restore_shortfall_against_min_gain():
    from pytest_qmr.pipeline import restore_shortfall

    won = {"quant_acc": 0.25, "restored_acc": 0.30}
    assert restore_shortfall(won, 0.05) is None  # exactly the required gain (no float-rounding miss)
    assert restore_shortfall(won, 0.06) == ("Restore won back +0.050 (quantized 0.250 -> restored 0.300), "
                                            "less than restore.min_gain 0.06")
    assert "less than" in restore_shortfall({"quant_acc": 0.3, "restored_acc": 0.25}, 0.0)
    assert restore_shortfall({"error": "nothing to restore: none of 3 cases ..."}, 0.0) == (
        "restore.min_gain 0 required, but Restore did not run: nothing to restore: none of 3 cases ...")


def test_cut_rejected_continuations_lose_the_eos_trl_appends(tokenizer):
    """A rejected step cut out of a trace (or one that ran into max_new_tokens) never stopped by
    itself: the EOS trl appends is dropped; a continuation ending on its answer line keeps it."""
    from datasets import Dataset

    from pytest_qmr.restore import drop_cut_eos, stopped_by_itself

    assert stopped_by_itself("Step 2: 3 + 4 = 8\nThe answer is 8.\n")
    assert not stopped_by_itself("Step 2: 3 + 4 = 8")
    assert not stopped_by_itself("Step 2: 3 + 4 = 8\nStep 3: 8 * 2 = 1")  # ran into the token limit
    eos = tokenizer.eos_token_id
    pairs = [PreferencePair("p", "Step 2: 3 + 4 = 7\nThe answer is 7.", rejected, "i", None, None, 2, "gold",
                            "all-step")
             for rejected in ("Step 2: 3 + 4 = 8", "Step 2: 3 + 4 = 8\nThe answer is 8.")]
    rows = [{"prompt_ids": [1], "chosen_ids": [5, eos], "rejected_ids": [6, 7, eos]} for _ in pairs]
    dataset, dropped = drop_cut_eos(Dataset.from_list(rows), pairs, eos)
    assert dropped == 1
    assert dataset["rejected_ids"] == [[6, 7], [6, 7, eos]] and dataset["chosen_ids"] == [[5, eos]] * 2
