"""The quality harness (dllm_export/eval): ELBO, masked accuracy, agreement, task scoring,
the CLI verb and the lm-evaluation-harness adapter, on tiny checkpoints and a tiny artifact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dllm_export.errors import DllmExportError
from dllm_export.eval import tasks
from dllm_export.eval.canvas import ScoredSequence, pack
from dllm_export.eval.generation import generate_all, generation_agreement, task_scores
from dllm_export.eval.harness import EvalOptions, evaluate
from dllm_export.eval.likelihood import bits_per_token, elbo, stratified_mask_counts
from dllm_export.eval.masked import mask_at_ratio
from dllm_export.eval.models import EvalModel
from dllm_export.runtime.api import GenerationOutput
from dllm_export.runtime.generate import Special

SEQ_LEN = 48
FAMILY = "llada-moe"  # exercises the MoE path end to end
# Small and quick: 8-token answers, few problems, few Monte-Carlo copies.
SAMPLER = {"gen_length": 8, "steps": 8, "block_length": 8}
TASK_DIR = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared cores: torch's default thread pool spins against other work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def eval_artifact(tiny_dir, tmp_path_factory):
    from dllm_export.export.onnx import ExportOptions, export_model

    out = tmp_path_factory.mktemp("eval-artifact") / FAMILY
    export_model(tiny_dir(FAMILY), out, ExportOptions(seq_len=SEQ_LEN))
    return out


def small_options(**overrides) -> EvalOptions:
    values = dict(
        tasks="add,sort",
        samples=3,
        mc_num=4,
        mc_batch=2,
        sampler=dict(SAMPLER),
        threads=1,
    )
    values.update(overrides)
    return EvalOptions(**values)


class ConstantLogits:
    """Every position gets the same logits, whatever the input."""

    special = Special(mask_id=9, eos_id=1, eot_id=2, pad_id=1)
    batch = 4

    def __init__(self, vocab: int = 10, seed: int = 0):
        self.row = np.random.default_rng(seed).normal(size=vocab).astype(np.float32)

    def logits(self, input_ids, attention_mask):
        return np.broadcast_to(self.row, (*input_ids.shape, len(self.row))).copy()


# ---------------------------------------------------------------- ELBO


@pytest.mark.parametrize(
    "target_len,batch,k",
    [(3, 16, 1), (3, 16, 3), (7, 4, 5), (2, 4, 2), (10, 10, 6), (1, 8, 1)],
)
def test_stratified_counts_match_llada_forward_process(target_len, batch, k):
    import torch

    # LLaDA get_log_likelihood.forward_process, the mask-count lines
    x = torch.round(
        torch.linspace(float(k), k + (batch - 1) * (target_len / batch), steps=batch)
    ).long()
    x = ((x - 1) % target_len) + 1
    assert stratified_mask_counts(k, target_len, batch).tolist() == x.tolist()


@pytest.mark.parametrize("target,tail", [(5, 0), (2, 3)])
def test_elbo_is_exact_when_every_token_costs_the_same(target, tail):
    # Same logits everywhere and one repeated token in the region: each copy's loss is
    # count * c / (count / T) = T * c, so the estimate is exact for any draw.
    model = ConstantLogits()
    token = 4
    sequence = ScoredSequence(
        prompt=(5, 6, 7), target=(token,) * target, tail=(token,) * tail
    )
    log_probs = model.row - np.log(np.exp(model.row.astype(np.float64)).sum())
    for seed in range(3):
        value = elbo([model], [sequence], mc_num=8, mc_batch=4, seed=seed, seq_len=12)[
            0
        ][0]
        assert value == pytest.approx((target + tail) * log_probs[token], rel=1e-6)
    # bits per target token: the tail's cost counts, its tokens do not
    bits = bits_per_token(np.array([value]), [sequence])
    assert bits == pytest.approx(
        -(target + tail) * log_probs[token] / math.log(2) / target
    )


def test_masks_cover_target_and_tail_at_the_ratio_and_never_the_prompt():
    sequences = [
        ScoredSequence((7, 7, 7), (1, 2, 3, 4), (0,) * 6),
        ScoredSequence((7,), (1, 2), (0,) * 8),
    ]
    ids, _ = pack(sequences, 16, pad_id=0)
    noisy, masked, scored = mask_at_ratio(
        np.random.default_rng(0), ids, sequences, 0.5, 99
    )
    assert (noisy[masked] == 99).all() and (noisy[~masked] == ids[~masked]).all()
    assert scored.sum(axis=1).tolist() == [2, 1]  # round(0.5 * target), scored
    assert masked.sum(axis=1).tolist() == [2 + 3, 1 + 4]  # plus round(0.5 * tail)
    assert not masked[0, :6].any() and not masked[1, :6].any()  # padding and prompts
    assert (ids[scored] != 0).all()  # only target tokens are scored


def test_elbo_of_one_token_equals_its_log_probability(tiny_dir):
    # With one target token every copy masks it (ratio 1): the ELBO is exactly
    # log p(token | prompt) from the full logits of that canvas.
    model = EvalModel.open(tiny_dir(FAMILY))
    example = tasks.held_out_examples("add", 1)[0]
    prompt = tuple(model.tokenizer.format_prompt(example.prompt, chat=True))
    sequence = ScoredSequence(prompt, (model.tokenizer.encode(example.answer)[0],))
    ids, attention = pack([sequence], sequence.length, model.special.pad_id)
    masked = ids.copy()
    masked[0, -1] = model.special.mask_id
    logits = model.generator.backend.logits(masked, attention)[0, -1].astype(np.float64)
    direct = (
        logits[sequence.target[0]]
        - np.log(np.exp(logits - logits.max()).sum())
        - logits.max()
    )
    value = elbo([model], [sequence], mc_num=4, mc_batch=2, seed=0, seq_len=None)[0][0]
    assert value == pytest.approx(direct, abs=1e-5)


# ---------------------------------------------------------------- agreement


def test_self_comparison_through_cli_agrees_fully(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from dllm_export.cli import main

    path = str(tiny_dir(FAMILY))
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            path,
            "--compare",
            path,
            "--tasks",
            "add",
            "--samples",
            "2",
            "--mc-num",
            "4",
            "--mc-batch",
            "2",
            "--ratios",
            "0.3,0.9",
            "--gen-length",
            "8",
            "--steps",
            "8",
            "--block-length",
            "8",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report) == {"settings", "model", "other", "agreement", "deltas"}
    assert report["agreement"]["masked"] == {"0.3": 1.0, "0.9": 1.0}
    assert report["agreement"]["generation"] == {
        "identical_share": 1.0,
        "token_agreement": 1.0,
    }
    deltas = report["deltas"]
    assert set(deltas["masked_accuracy"].values()) == {0.0}
    assert deltas["elbo_bits_per_token"] == 0.0
    assert set(deltas["task_accuracy"].values()) == {0.0}
    assert deltas["tokens_per_forward"] == 0.0
    for side in ("model", "other"):
        speed = report[side]["speed"]
        assert speed["tokens_per_second"] > 0 and speed["tokens_per_forward"] > 0
        assert math.isfinite(report[side]["elbo"]["bits_per_token"])


def test_checkpoint_and_its_fp32_artifact_agree(tiny_dir, eval_artifact):
    report = evaluate(
        tiny_dir(FAMILY),
        other=eval_artifact,
        options=small_options(tasks="add", samples=6),
    )
    assert (
        report["settings"]["seq_len"] == SEQ_LEN
    )  # PyTorch ran on the artifact's canvas
    assert report["other"]["info"]["backend"] == "onnxruntime"
    for ratio, agreement in report["agreement"]["masked"].items():
        assert agreement >= 0.999, ratio
    assert report["agreement"]["generation"]["identical_share"] == 1.0
    # fp32 export: the ELBO moves only by float rounding
    assert abs(report["deltas"]["elbo_bits_per_token"]) < 1e-4
    assert (
        report["other"]["elbo"]["answer_tokens"]
        == report["model"]["elbo"]["answer_tokens"]
    )


# ---------------------------------------------------------------- task scoring


class FakeGenerator:
    """Answers from a table; counts calls like the runtime."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def generate(self, prompts, chat=False, **_):
        texts = [self.answers[p] for p in prompts]
        tokens = [[ord(c) for c in t] for t in texts]
        return GenerationOutput(
            texts=texts,
            tokens=tokens,
            forwards=4,
            generated_tokens=sum(map(len, tokens)),
            seconds=0.5,
            step_ms_median=0.0,
            forward_ms_median=0.0,
        )


def test_task_scores_on_known_outputs():
    adds = tasks.held_out_examples("add", 4)
    sorts = tasks.held_out_examples("sort", 2)
    answers = {e.prompt: e.answer for e in adds[:3] + sorts}
    answers[adds[3].prompt] = "not a number"
    answers[sorts[0].prompt] = f"  {sorts[0].answer}\n"  # surrounding space is trimmed
    examples = adds + sorts
    run = generate_all(FakeGenerator(answers), [e.prompt for e in examples], batch=4)
    scores = task_scores(examples, run.texts)
    assert scores["add"] == {"accuracy": 0.75, "correct": 3, "count": 4}
    assert scores["sort"]["accuracy"] == 1.0
    assert scores["mean"] == pytest.approx(0.875)
    speed = run.speed(batch=4)
    # two batches (4 + 2 prompts) of 4 forwards: 24 sequence-forwards, warm-up not counted
    assert speed["forwards"] == 8 and speed["generated_tokens"] == sum(
        map(len, run.texts)
    )
    assert speed["tokens_per_forward"] == pytest.approx(
        run.generated_tokens / 24, abs=1e-4
    )


def test_generation_agreement_counts_tokens_and_lengths():
    same = generation_agreement([[1, 2, 3], []], [[1, 2, 3], []])
    assert same == {"identical_share": 1.0, "token_agreement": 1.0}
    # [1, 2, 3, end] vs [1, 5, end]: positions 0 match, 1 and 2 differ, 3 only in one
    differ = generation_agreement([[1, 2, 3]], [[1, 5]])
    assert differ == {"identical_share": 0.0, "token_agreement": 0.25}


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "options,words",
    [
        (dict(tasks="add,poetry"), "poetry"),
        (dict(tasks=""), "choose from"),
        (dict(samples=0), "--samples"),
        (dict(ratios="0.5,1.5"), "--ratios"),
        (dict(ratios="half"), "--ratios"),
        (dict(mc_num=6, mc_batch=4), "--mc-num"),
    ],
)
def test_bad_options_are_one_line_errors(options, words):
    with pytest.raises(DllmExportError) as err:
        EvalOptions(**options)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_cli_rejects_unknown_task_and_non_model(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from dllm_export.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["eval", str(tiny_dir(FAMILY)), "--tasks", "poetry"])
    assert (
        result.exit_code == 1
        and "error:" in result.output
        and "poetry" in result.output
    )
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["eval", str(tmp_path), "--samples", "1"])
    assert result.exit_code == 1 and "neither a checkpoint" in result.output


def test_artifact_evaluation_never_imports_torch(eval_artifact):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        from dllm_export.eval.harness import EvalOptions, evaluate
        options = EvalOptions(tasks="add", samples=2, ratios="0.5", mc_num=2, threads=1,
                              sampler={SAMPLER!r})
        report = evaluate({str(eval_artifact)!r}, options=options)
        assert "torch" not in sys.modules
        print("bits", report["model"]["elbo"]["bits_per_token"] > 0)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "bits True"


def test_sequences_longer_than_the_artifact_canvas_are_refused(eval_artifact):
    with pytest.raises(DllmExportError, match="--seq-len"):
        evaluate(eval_artifact, options=small_options(tasks="reverse", samples=20))


# ---------------------------------------------------------------- lm-evaluation-harness


@pytest.fixture
def lm_eval_model(tiny_dir):
    pytest.importorskip(
        "lm_eval", reason="lm-eval not installed (pip install 'dllm-export[eval]')"
    )
    from dllm_export.eval.lm_eval_adapter import DllmExportLM

    return DllmExportLM(
        path=str(tiny_dir(FAMILY)), mc_num=4, mc_batch=2, seed=3, **SAMPLER
    )


def test_lm_eval_loglikelihood_is_the_harness_elbo(lm_eval_model):
    from lm_eval.api.instance import Instance

    pairs = [("What is 12 + 34? Answer:", " 46"), ("Sort: 9 2 7 Answer: ", "2 7 9")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = lm_eval_model.loglikelihood(requests)
    sequences = [lm_eval_model._pair(*pair) for pair in pairs]
    # the trailing space of the second context moves to its continuation
    assert lm_eval_model.model.tokenizer.decode(sequences[1].target).startswith(" ")
    expected = elbo([lm_eval_model.model], sequences, 4, 2, 3, None)[0]
    assert [r[0] for r in results] == pytest.approx(expected.tolist())
    assert all(r[1] is False for r in results)
    with pytest.raises(NotImplementedError, match="masked-diffusion"):
        lm_eval_model.loglikelihood_rolling(requests)


def test_lm_eval_runs_local_yaml_tasks(lm_eval_model, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.chdir(TASK_DIR)  # the YAML's data_files are relative to here
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model=lm_eval_model,
        tasks=["dllm_arith_choice", "dllm_arith_gen"],
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        bootstrap_iters=0,
        log_samples=False,
    )
    scores = results["results"]
    assert 0.0 <= scores["dllm_arith_choice"]["acc,none"] <= 1.0
    assert 0.0 <= scores["dllm_arith_gen"]["exact_match,none"] <= 1.0


def test_cache_modes_report_accuracy_beside_speed():
    """Each cache mode (and threshold) generates the held-out tasks once; the first mode
    is the reference the others' agreement is measured against."""
    from dllm_export.shipped import LLADA_MOE_TASKS

    options = EvalOptions(tasks="sort,reverse", samples=6, mc_num=0, ratios="0.5",
                          cache_modes="none,dual,block", thresholds="0.5")
    report = evaluate(str(LLADA_MOE_TASKS), options=options)
    rows = report["cache_modes"]
    assert [(r["cache"], r["threshold"]) for r in rows] == [
        ("none", None), ("dual", None), ("block", None),
        ("none", 0.5), ("dual", 0.5), ("block", 0.5)]
    assert rows[0]["tasks"] == report["model"]["tasks"]  # the default run is the none run
    assert rows[0]["agreement_with_none"]["identical_share"] == 1.0
    assert rows[3]["agreement_with_none"]["identical_share"] == 1.0
    for row in rows:
        assert 0 <= row["tasks"]["mean"] <= 1 and row["speed"]["forwards"] > 0
    # the schedule commits one position per forward in every mode; block adds its commits
    assert rows[0]["speed"]["tokens_per_forward"] > rows[2]["speed"]["tokens_per_forward"]
    with pytest.raises(DllmExportError, match="--cache-modes none,full: choose from"):
        EvalOptions(cache_modes="none,full")
