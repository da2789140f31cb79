"""HALO layer selection on a tiny random teacher: students, alignment (resume, 2 gloo ranks), sweep, scores,
selection and baselines, tasks, output files, the CLI, and the hand-over to the conversion."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sala_train.layer_selection import (
    AlignConfig,
    AlignmentResumeError,
    HaloConfig,
    LayerPlan,
    LayerPlanError,
    SelectionConfig,
    TaskConfig,
    align_students,
    build_students,
    build_tasks,
    importance_scores,
    load_corpus,
    register_task,
    run_halo,
    select_plan,
    student_in_place,
    sweep,
)
from sala_train.layer_selection import halo as halo_module
from sala_train.layer_selection.align import alignment_mse, learning_rate, student_state_dict
from sala_train.layer_selection.halo import CSV_COLUMNS, StudentAttention
from sala_train.layer_selection.tasks import (
    TASK_REGISTRY,
    RecallExample,
    Task,
    build_task,
    kv_recall_examples,
    needle_examples,
    passkey_examples,
    score_answers,
)
from sala_train.make_teacher import make_teacher
from sala_train.models import MiniCPMConfig, MiniCPMForCausalLM
from sala_train.models.sala import LightningMixer
from sala_train.testing import assert_close, module_available, requires_module, run_distributed
from sala_train.tokenizer import DEFAULT_SAMPLE_TEXT, load_tokenizer

LAYERS = 4
SEQ_LEN = 32


def tiny_teacher_config():
    return MiniCPMConfig(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, scale_emb=12.0, scale_depth=1.4,
                         dim_model_base=16, max_position_embeddings=512)


def tiny_align_config(**overrides):
    values = dict(steps=6, seq_len=SEQ_LEN, batch_size=2, warmup_steps=2, log_every=2, checkpoint_every=1000)
    values.update(overrides)
    return AlignConfig(**values)


def tiny_task_config(**overrides):
    values = dict(context_len=96, num_examples=3, heldout_sequences=2, heldout_len=48, batch_size=3)
    values.update(overrides)
    return TaskConfig(**values)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, and on a busy 2-core machine
    its spin-waits slow the tests down by an order of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("halo") / "teacher"
    make_teacher(tiny_teacher_config(), path, progress=False)
    return path


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return MiniCPMForCausalLM.from_pretrained(teacher_dir).requires_grad_(False)


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    return load_tokenizer(teacher_dir)


@pytest.fixture(scope="module")
def corpus(tokenizer):
    return load_corpus([DEFAULT_SAMPLE_TEXT], tokenizer)


def _students(teacher):
    return build_students(teacher, lightning_backend="torch")


# ---------------------------------------------------------------------------------------------------------
# Students and alignment
# ---------------------------------------------------------------------------------------------------------

def test_students_start_from_the_teacher_attention(teacher):
    students = _students(teacher)
    assert len(students) == LAYERS and all(isinstance(s, LightningMixer) for s in students)
    attention = teacher.model.layers[2].self_attn
    student = students[2]
    assert torch.equal(student.q_proj.weight, attention.q_proj.weight)
    assert torch.equal(student.o_proj.weight, attention.o_proj.weight)
    k_teacher, k_student = attention.k_proj.weight.view(2, 16, 64), student.k_proj.weight.view(4, 16, 64)
    for head in range(4):  # head i takes KV head i // group (group 2)
        assert torch.equal(k_student[head], k_teacher[head // 2])
    for norm in (student.q_norm, student.k_norm, student.o_norm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert not any(p.requires_grad for p in teacher.parameters())
    # the names of the conversion's `aligned` input, one set of SPEC 2.4 tensors per layer
    names = set(student_state_dict(students))
    expected = {f"model.layers.{i}.self_attn.{p}.weight" for i in range(LAYERS)
                for p in ("q_proj", "k_proj", "v_proj", "o_proj", "z_proj", "q_norm", "k_norm", "o_norm")}
    assert names == expected


def test_alignment_lowers_every_layer_mse(teacher, corpus, tmp_path):
    students = _students(teacher)
    sequences = corpus.train_sequences(SEQ_LEN)
    probe = corpus.heldout_tokens[: 4 * SEQ_LEN].view(4, SEQ_LEN)  # text the alignment never sees
    before = alignment_mse(teacher, students, probe)
    result = align_students(teacher, students, sequences, tiny_align_config(steps=15, lr=3e-3), tmp_path,
                            progress=False)
    after = alignment_mse(teacher, students, probe)
    assert result.finished and result.step == 15 and result.tokens == 15 * 2 * SEQ_LEN
    assert (after < 0.8 * before).all(), f"MSE per layer before {before.tolist()}, after {after.tolist()}"
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [2, 4, 6, 8, 10, 12, 14, 15]
    assert len(logged[-1]["mse"]) == LAYERS


def test_resumed_alignment_equals_an_uninterrupted_one(teacher, corpus, tmp_path):
    sequences = corpus.train_sequences(SEQ_LEN)
    straight = _students(teacher)
    align_students(teacher, straight, sequences, tiny_align_config(), tmp_path / "straight", progress=False)

    first = _students(teacher)
    half = align_students(teacher, first, sequences, tiny_align_config(stop_at=3), tmp_path / "resumed",
                          progress=False)
    assert half.step == 3 and not half.finished
    resumed = _students(teacher)  # a fresh process would start from the teacher's weights again
    done = align_students(teacher, resumed, sequences, tiny_align_config(), tmp_path / "resumed", progress=False)
    assert done.finished and done.first_mse == half.first_mse
    for name, tensor in student_state_dict(straight).items():
        assert torch.equal(student_state_dict(resumed)[name], tensor), name

    with pytest.raises(AlignmentResumeError, match="lr"):  # a checkpoint of another run is never mixed in
        align_students(teacher, _students(teacher), sequences, tiny_align_config(lr=5e-4), tmp_path / "resumed",
                       progress=False)


def test_schedule_and_token_budget():
    config = AlignConfig(lr=1e-3, min_lr=1e-5, warmup_steps=4)
    rates = [learning_rate(step, config, total_steps=20) for step in range(20)]
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warmup
    assert all(a >= b for a, b in zip(rates[3:], rates[4:]))  # then cosine down
    assert learning_rate(20, config, total_steps=20) == pytest.approx(1e-5)
    # HALO budgets tokens: 1000 tokens of 2 ranks x 2 sequences x 32 tokens = 7.8 -> 8 steps
    assert AlignConfig(tokens=1000, batch_size=2, seq_len=32).total_steps(world_size=2) == 8


def _align_on_rank(rank, world_size, teacher_dir, run_dir, batch_size):
    """One rank of a 2-process alignment (module level: run_distributed imports it by name)."""
    teacher = MiniCPMForCausalLM.from_pretrained(teacher_dir)
    corpus = load_corpus([DEFAULT_SAMPLE_TEXT], load_tokenizer(teacher_dir))
    students = _students(teacher)
    config = tiny_align_config(steps=3, batch_size=batch_size)
    align_students(teacher, students, corpus.train_sequences(SEQ_LEN), config, run_dir, progress=False)
    return student_state_dict(students)


def test_two_gloo_ranks_train_the_same_students_as_one_process(teacher_dir, tmp_path):
    ranks = run_distributed(_align_on_rank, world_size=2, args=(str(teacher_dir), str(tmp_path / "ddp"), 1))
    single = _align_on_rank(0, 1, teacher_dir, tmp_path / "single", 2)  # the same global batch of 2 sequences
    for name, tensor in ranks[0].items():
        assert torch.equal(ranks[1][name], tensor), f"{name} differs between the ranks"
        # the DDP mean of two 1-sequence gradients vs one 2-sequence gradient: equal up to fp32 summation order
        assert_close(tensor, single[name], ratio=1e-4, name=name)
    assert (tmp_path / "ddp" / "checkpoint" / "state.json").is_file()


# ---------------------------------------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------------------------------------

def _swapped_layers(model, tokenizer):
    """A task that reports which attention layers are students right now (as a number: sum of 10**i)."""
    layers = model.model.layers
    return float(sum(10**i for i, layer in enumerate(layers) if isinstance(layer.self_attn, StudentAttention)))


def test_sweep_replaces_exactly_one_layer_at_a_time(teacher, tokenizer):
    students = _students(teacher)
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = teacher(input_ids=ids, output_hidden_states=True)
    originals = [layer.self_attn for layer in teacher.model.layers]

    result = sweep(teacher, students, tokenizer, [Task("swapped", _swapped_layers)], progress=False)
    assert [m["swapped"]["score"] for m in result["layers"]] == [1.0, 10.0, 100.0, 1000.0]
    assert result["teacher"]["swapped"]["score"] == 0.0
    assert [layer.self_attn for layer in teacher.model.layers] == originals
    with torch.no_grad():
        assert torch.equal(teacher(input_ids=ids).logits, before.logits)  # the teacher is intact afterwards

        with student_in_place(teacher, 2, students[2]) as model:
            swapped = model(input_ids=ids, output_hidden_states=True)
    for i in range(3):  # the embeddings and the outputs of layers 0, 1 are untouched; layer 2's are not
        assert torch.equal(swapped.hidden_states[i], before.hidden_states[i])
    assert not torch.allclose(swapped.hidden_states[3], before.hidden_states[3])
    assert not torch.allclose(swapped.logits, before.logits)


# ---------------------------------------------------------------------------------------------------------
# Scores, selection, baselines
# ---------------------------------------------------------------------------------------------------------

def test_importance_scores_follow_the_formula():
    recall = [0.9, 0.5, 0.8, 0.9, 0.1]
    general = [-1.0, -1.1, -1.5, -1.2, -1.0]
    scores = importance_scores(recall, general, eps=1e-3, clip=50.0)
    expected = [0.0, 0.4 / 0.101, 0.1 / 0.501, 0.0, 50.0]  # the last: 0.8 / 0.001 = 800, clipped at 50
    assert scores == pytest.approx(expected)
    assert importance_scores([1.0, 1.0], [0.0, 0.0]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="one recall and one general"):
        importance_scores([1.0], [1.0, 2.0])


def test_selection_keeps_the_top_scores_and_the_forced_layers():
    recall = [0.0, 0.9, 0.2, 0.9, 0.5, 0.9, 0.9, 0.1]  # recall drop 0.9 0 0.7 0 0.4 0 0 0.8
    general = [-1.0] * 8
    general[7] = -2.0  # layer 7 costs general ability too: lower score than its recall drop alone suggests
    free = select_plan(SelectionConfig(ratio=0.25, forced_layers=[]), 8, recall, general)
    assert free.sparse_layers == [0, 2]  # scores 50 (clipped) for 0, 2, 4; ties go to the larger recall drop
    forced = select_plan(SelectionConfig(ratio=0.25), 8, recall, general)
    assert forced.sparse_layers == [0, 7]  # first and last, counted inside floor(8 / 4) = 2
    one_forced = select_plan(SelectionConfig(ratio=0.375, forced_layers=[-1]), 8, recall, general)
    assert one_forced.sparse_layers == [0, 2, 7]
    assert one_forced.evidence["method"] == "halo" and one_forced.evidence["forced_layers"] == [7]
    assert one_forced.evidence["num_sparse"] == 3 and one_forced.evidence["ratio"] == 0.375
    assert one_forced.evidence["recall"] == recall and len(one_forced.evidence["scores"]) == 8

    with pytest.raises(LayerPlanError, match="forced layers"):
        select_plan(SelectionConfig(ratio=0.25, forced_layers=[0, 3, -1]), 8, recall, general)
    with pytest.raises(LayerPlanError, match="ratio"):
        select_plan(SelectionConfig(ratio=0.1), 8, recall, general)
    with pytest.raises(LayerPlanError, match="outside"):
        select_plan(SelectionConfig(forced_layers=[8]), 8, recall, general)


def test_baselines():
    recall = [0.0, 0.9, 0.2, 0.9, 0.5, 0.9, 0.9, 0.1]
    general = [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -2.0]
    drop = select_plan(SelectionConfig(method="recall_drop", ratio=0.25, forced_layers=[]), 8, recall, general)
    assert drop.sparse_layers == [0, 7]  # recall drop alone ignores layer 7's general cost
    even = select_plan(SelectionConfig(method="evenly_spaced", ratio=0.5), 8)
    assert even.sparse_layers == LayerPlan.evenly_spaced(8, 4).sparse_layers == [0, 2, 5, 7]
    given = select_plan(SelectionConfig(method="pattern", pattern="SLLSLLLS"), 8, recall, general)
    assert given.format() == "SLLSLLLS" and given.evidence["method"] == "pattern"
    with pytest.raises(LayerPlanError, match="8"):
        select_plan(SelectionConfig(method="pattern", pattern="SLLS"), 8)
    with pytest.raises(ValueError, match="method"):
        select_plan(SelectionConfig(method="random"), 8)


# ---------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------

def test_recall_tasks_are_deterministic_and_well_formed(tokenizer, corpus):
    passkey = passkey_examples(tokenizer, 4, 128, seed=1)
    assert [e.ids for e in passkey] == [e.ids for e in passkey_examples(tokenizer, 4, 128, seed=1)]
    assert [e.ids for e in passkey] != [e.ids for e in passkey_examples(tokenizer, 4, 128, seed=2)]
    needle = needle_examples(tokenizer, corpus.heldout_documents, 3, 128, seed=1)
    kv = kv_recall_examples(tokenizer, 2, 128, seed=1, num_queries=4)
    for example in passkey + needle + kv:
        assert example.ids[0] == tokenizer.bos_token_id
        assert 64 <= len(example.ids) <= 128 + 16  # about context_len
        for a, b in example.answers:
            assert 0 < a < b <= len(example.ids)
    for example in passkey + needle:  # one answer at the end: the number, stated earlier in the prompt
        (a, b), = example.answers
        number = tokenizer.decode(example.ids[a:b]).strip()
        assert b == len(example.ids) and number.isdigit() and number in tokenizer.decode(example.ids[:a])
    assert [len(e.answers) for e in kv] == [4, 4]
    needle_text = [tokenizer.decode(e.ids) for e in needle]  # depths 0, 0.5, 1: the needle moves to the back
    positions = [t.index("special magic number") / len(t) for t in needle_text]
    assert positions[0] < positions[1] < positions[2]


class _Oracle(torch.nn.Module):
    """Predicts the next input token with certainty (teacher forcing makes it an oracle); or uniform."""

    def __init__(self, vocab, uniform=False):
        super().__init__()
        self.vocab, self.uniform, self.anchor = vocab, uniform, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if not self.uniform:
            logits.scatter_(-1, input_ids.roll(-1, dims=1)[..., None], 30.0)
        return type("Out", (), {"logits": logits})()


def test_answer_scoring_reads_the_answer_positions(tokenizer):
    examples = kv_recall_examples(tokenizer, 3, 96, seed=0) + [RecallExample([1, 5, 6, 7], [(2, 4)])]
    perfect = score_answers(_Oracle(4096), examples, batch_size=2, pad_id=2)
    assert perfect["exact_match"] == 1.0 and perfect["logprob"] == pytest.approx(0.0, abs=1e-6)
    uniform = score_answers(_Oracle(4096, uniform=True), examples, batch_size=2, pad_id=2)
    assert uniform["logprob"] == pytest.approx(-torch.log(torch.tensor(4096.0)).item())
    assert uniform["exact_match"] == 0.0  # argmax of a tie is token 0, never an answer here


def test_built_in_and_user_tasks(teacher, tokenizer, corpus):
    recall, general = build_tasks(tiny_task_config(), tokenizer, corpus)
    assert [t.name for t in recall] == ["passkey", "needle", "kv_recall"] and [t.name for t in general] == ["lm_loss"]
    loss = general[0](teacher, tokenizer)
    assert loss["score"] == loss["neg_loss"] == -loss["loss"] and 0.0 <= loss["accuracy"] <= 1.0
    assert loss["loss"] == pytest.approx(8.3, abs=0.3)  # a random teacher: about ln(4096)
    passkey = recall[0](teacher, tokenizer)
    assert passkey["score"] == passkey["logprob"] < 0 and 0.0 <= passkey["exact_match"] <= 1.0
    by_accuracy = build_task("passkey", tiny_task_config(recall_metric="exact_match"), tokenizer, corpus)
    assert by_accuracy(teacher, tokenizer)["score"] == passkey["exact_match"]

    register_task("test_constant", lambda model, tok: 0.25)
    try:
        assert build_task("test_constant", tiny_task_config(), tokenizer, corpus)(teacher, tokenizer) == {"score": 0.25}
    finally:
        del TASK_REGISTRY["test_constant"]
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        build_task("nope", tiny_task_config(), tokenizer, corpus)
    with pytest.raises(ValueError, match="built-in"):
        register_task("passkey", lambda model, tok: 0.0)
    with pytest.raises(ValueError, match="recall_metric"):
        build_tasks(tiny_task_config(recall_metric="f1"), tokenizer, corpus)


@pytest.mark.skipif(module_available("lm_eval"), reason="lm_eval is installed")
def test_lm_eval_task_without_the_package_says_what_to_install(teacher, tokenizer, corpus):
    task = build_task("lm_eval:hellaswag", tiny_task_config(), tokenizer, corpus)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        task(teacher, tokenizer)


@requires_module("lm_eval")
def test_lm_eval_adapter_wraps_the_model(teacher, tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=teacher, tokenizer=tokenizer, batch_size=1)
    request = Instance(request_type="loglikelihood", doc={}, arguments=("The pass key is", " 12345"), idx=0)
    (logprob, _), = lm.loglikelihood([request])
    assert logprob < 0


# ---------------------------------------------------------------------------------------------------------
# The whole pipeline
# ---------------------------------------------------------------------------------------------------------

def _halo_config(teacher_dir, output, **overrides):
    values = dict(teacher=str(teacher_dir), output=str(output), lightning_backend="torch",
                  align=tiny_align_config(), tasks=tiny_task_config(), selection=SelectionConfig(ratio=0.5))
    values.update(overrides)
    return HaloConfig(**values)


@pytest.fixture(scope="module")
def halo_run(teacher_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("halo_run") / "select"
    assert run_halo(_halo_config(teacher_dir, output, align=tiny_align_config(stop_at=2)), progress=False) is None
    assert not (output / "plan.json").exists()  # stopped early: nothing but the resumable alignment
    plan = run_halo(_halo_config(teacher_dir, output), progress=False)
    return output, plan


def test_outputs_are_written_and_consistent(halo_run):
    output, plan = halo_run
    for name in ("plan.json", "scores.csv", "scores.png", "students.safetensors", "sweep.json", "run.json",
                 "align/log.jsonl", "align/checkpoint/state.json"):
        assert (output / name).is_file(), name
    assert LayerPlan.load(output / "plan.json") == plan
    e = plan.evidence
    assert e["method"] == "halo" and e["ratio"] == 0.5 and e["forced_layers"] == [0, LAYERS - 1]
    assert plan.sparse_layers == [0, LAYERS - 1] and e["alignment"]["steps"] == 6
    assert e["scores"] == importance_scores(e["recall"], e["general"], eps=e["eps"], clip=e["clip"])
    assert set(e["baselines"]) == {"halo", "recall_drop", "evenly_spaced"}

    with open(output / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0])[: len(CSV_COLUMNS)] == CSV_COLUMNS and "needle.exact_match" in rows[0]
    assert [int(r["layer"]) for r in rows] == list(range(LAYERS))
    for i, row in enumerate(rows):
        assert float(row["recall"]) == e["recall"][i] and float(row["general"]) == e["general"][i]
        assert float(row["recall_drop"]) == e["recall_drop"][i] and float(row["score"]) == e["scores"][i]
        assert float(row["general_drop"]) == e["general_drop"][i]
        assert row["chosen"] == str(int(i in plan.sparse_layers))
        assert float(row["lm_loss.neg_loss"]) == e["general"][i]  # C is the mean of one general task here

    assert (output / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    image = imread(output / "scores.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    students = load_file(output / "students.safetensors")
    assert len(students) == 8 * LAYERS and "model.layers.3.self_attn.z_proj.weight" in students
    run = json.loads((output / "run.json").read_text())
    assert run["config"]["align"]["steps"] == 6 and run["world_size"] == 1


def test_a_rerun_reuses_the_sweep_and_reselects(halo_run, teacher_dir, monkeypatch):
    output, plan = halo_run
    sweep_before = (output / "sweep.json").read_text()

    def no_sweep(*args, **kwargs):
        raise AssertionError("the sweep of the first run should have been reused")

    monkeypatch.setattr(halo_module, "sweep", no_sweep)
    even = run_halo(_halo_config(teacher_dir, output, selection=SelectionConfig(method="evenly_spaced", ratio=0.5)),
                    progress=False)
    assert (output / "sweep.json").read_text() == sweep_before
    assert even.sparse_layers == LayerPlan.evenly_spaced(LAYERS, 2).sparse_layers
    assert LayerPlan.load(output / "plan.json").evidence["method"] == "evenly_spaced"
    assert even.evidence["recall"] == plan.evidence["recall"]
    plan.save(output / "plan.json")  # put the HALO plan back for the conversion test


def test_the_output_feeds_the_conversion(halo_run, teacher_dir, tmp_path):
    conversion = pytest.importorskip("sala_train.conversion")
    from sala_train.models.sala import MiniCPMSALAForCausalLM

    output, _ = halo_run
    plan = LayerPlan.load(output / "plan.json")
    conversion.convert(teacher_dir, plan, tmp_path / "student", aligned=output / "students.safetensors",
                       progress=False)
    student = MiniCPMSALAForCausalLM.from_pretrained(tmp_path / "student").state_dict()
    aligned = load_file(output / "students.safetensors")
    teacher = MiniCPMForCausalLM.from_pretrained(teacher_dir).state_dict()
    for i in plan.lightning_layers:
        for p in ("q_proj", "k_proj", "v_proj", "o_proj", "z_proj", "q_norm", "k_norm", "o_norm"):
            name = f"model.layers.{i}.self_attn.{p}.weight"
            assert torch.equal(student[name], aligned[name]), name
    for i in plan.sparse_layers:  # sparse layers keep the teacher's attention
        name = f"model.layers.{i}.self_attn.k_proj.weight"
        assert torch.equal(student[name], teacher[name]), name


def test_a_bad_selection_fails_before_the_alignment(teacher_dir, tmp_path):
    config = _halo_config(teacher_dir, tmp_path / "bad", selection=SelectionConfig(ratio=0.25))  # k = 1 < 2 forced
    with pytest.raises(LayerPlanError, match="forced layers"):
        run_halo(config, progress=False)
    assert not (tmp_path / "bad").exists()


def _halo_on_rank(rank, world_size, teacher_dir, output):
    """One rank of a 2-process run_halo: the alignment under DDP, the sweep's layers split between the ranks."""
    plan = run_halo(_halo_config(teacher_dir, output, align=tiny_align_config(steps=3, batch_size=1)), progress=False)
    return plan.to_dict()


def test_two_gloo_ranks_run_the_whole_selection(teacher_dir, tmp_path):
    ranks = run_distributed(_halo_on_rank, world_size=2, args=(str(teacher_dir), str(tmp_path / "ddp")))
    assert ranks[0] == ranks[1]  # every rank ends with the same plan and evidence (the gathered sweep)
    single = run_halo(_halo_config(teacher_dir, tmp_path / "single", align=tiny_align_config(steps=3)),
                      progress=False)
    evidence = ranks[0]["evidence"]
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["world_size"] == 2
    # the same global batch, so the same students up to fp32 summation order, so the same sweep up to that
    assert evidence["recall"] == pytest.approx(single.evidence["recall"], rel=1e-5)
    assert evidence["general"] == pytest.approx(single.evidence["general"], rel=1e-5)
    distributed = load_file(tmp_path / "ddp" / "students.safetensors")
    for name, tensor in load_file(tmp_path / "single" / "students.safetensors").items():
        assert_close(distributed[name], tensor, ratio=1e-4, name=name)


def test_command_line_end_to_end(teacher_dir, tmp_path):
    output = tmp_path / "cli"
    command = [sys.executable, "-m", "sala_train.select", f"teacher={teacher_dir}", f"output={output}",
               "lightning_backend=torch", "align.steps=3", f"align.seq_len={SEQ_LEN}", "align.batch_size=2",
               "align.warmup_steps=1", "tasks.context_len=96", "tasks.num_examples=2", "tasks.heldout_len=48",
               "tasks.heldout_sequences=2", "selection.ratio=0.5", "selection.method=recall_drop"]
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plan S" in done.stdout
    plan = LayerPlan.load(output / "plan.json")
    assert plan.evidence["method"] == "recall_drop" and len(plan.sparse_layers) == 2
    assert (output / "scores.png").is_file() and (output / "students.safetensors").is_file()


def test_sweep_shards_of_a_job_array_merge_into_the_same_plan(halo_run, teacher_dir, tmp_path, monkeypatch):
    # align once, score the layers in 2 shards (as 2 tasks of a job array), merge: the same sweep and plan as
    # the single run of halo_run (same teacher, tasks and alignment), and the merge runs no sweep itself
    output, plan = halo_run
    array = tmp_path / "array"
    with pytest.raises(FileNotFoundError, match="align_only=true"):
        run_halo(_halo_config(teacher_dir, array, sweep_shard="0/2"), progress=False)
    assert run_halo(_halo_config(teacher_dir, array, align_only=True), progress=False) is None
    assert (array / "students.safetensors").is_file() and not (array / "sweep.json").exists()
    for i in range(2):
        assert run_halo(_halo_config(teacher_dir, array, sweep_shard=f"{i}/2"), progress=False) is None
        shard = json.loads((array / f"sweep-shard-{i}-of-2.json").read_text())
        assert [m is not None for m in shard["layers"]] == [j % 2 == i for j in range(LAYERS)]

    def no_sweep(*args, **kwargs):
        raise AssertionError("the merge should use the shard files")

    monkeypatch.setattr(halo_module, "sweep", no_sweep)
    merged = run_halo(_halo_config(teacher_dir, array), progress=False)
    single = json.loads((output / "sweep.json").read_text())
    assert json.loads((array / "sweep.json").read_text())["layers"] == single["layers"]
    assert merged.sparse_layers == plan.sparse_layers and merged.evidence["scores"] == plan.evidence["scores"]
    with pytest.raises(ValueError, match="need 0 <= i < n"):
        run_halo(_halo_config(teacher_dir, array, sweep_shard="2/2"), progress=False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_right_padded_batches_score_as_one_example_at_a_time(backend):
    """score_answers pads batches on the right without a mask (the quality study scores 8 at a time): a hybrid
    model, sparse and lightning layers both, must give every example the scores it gets alone."""
    from sala_train.models import SALAConfig, SALAForCausalLM

    torch.manual_seed(0)
    config = SALAConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, dim_model_base=16,
                        mixer_types=["minicpm4", "lightning-attn", "lightning-attn", "minicpm4"], lightning_nh=4,
                        lightning_nkv=4, lightning_head_dim=16, lightning_backend=backend, sparse_backend=backend,
                        sparse_config={"kernel_size": 8, "kernel_stride": 4, "block_size": 16, "init_blocks": 1,
                                       "window_size": 32, "topk": 2, "dense_len": 64})
    model = SALAForCausalLM(config).eval()
    rng = torch.Generator().manual_seed(1)
    examples = []
    for length in (150, 97, 40):  # past dense_len (sparse selection) and below it, three different paddings
        ids = [1] + torch.randint(3, 97, (length - 1,), generator=rng).tolist()
        examples.append(RecallExample(ids, [(length - 6, length - 3), (length - 2, length)]))
    with torch.no_grad():
        alone = [score_answers(model, [e], 1, pad_id=0) for e in examples]
        batched = [score_answers(model, [e], 1, pad_id=0) for e in examples]  # the same call twice: deterministic
        together = score_answers(model, examples, 3, pad_id=0)
    assert alone == batched
    assert together["logprob"] == pytest.approx(sum(a["logprob"] for a in alone) / 3, rel=1e-5)
    assert together["exact_match"] == sum(a["exact_match"] for a in alone) / 3
