"""Tasks of the HALO sweep (SPEC 5.3): recall R and general ability C of a model, built in or user-given.

Built in (small scale, generated deterministically from a seed with the model's tokenizer):

    passkey     a 5-digit pass key hidden in repeated filler text, asked for at the end
    needle      a key sentence ("The special magic number for X is N.") at depths 0 .. 1 of held-out text
    kv_recall   multi-query key-value recall: lines "key: value", then several of the keys asked again
    lm_loss     general ability: next-token loss and accuracy on held-out text

For evaluation by length and depth (the quality study, benchmarks/quality/): ``hidden_fact_examples`` puts a pass
key, or the asked one of several needles, at a fixed depth of held-out text.

A recall task scores its answers by teacher forcing, one forward per batch:
    logprob      mean log-probability of the answer tokens (continuous: informative even for a weak model)
    exact_match  every answer token is the argmax given the tokens before it (exactly what greedy decoding
                 produces for the answer's length)

User tasks: ``register_task("name", fn)`` (or as a decorator) with ``fn(model, tokenizer) -> float`` (higher is
better) or a dict of metrics with a "score" entry; then list "name" under tasks.recall or tasks.general.
``lm_eval:<task>`` runs a task of lm-evaluation-harness where that package is installed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .corpus import Corpus


@dataclass
class TaskConfig:
    recall: list[str] = field(default_factory=lambda: ["passkey", "needle", "kv_recall"])
    general: list[str] = field(default_factory=lambda: ["lm_loss"])
    context_len: int = 512  # tokens of each recall prompt (about)
    num_examples: int = 16  # per recall task
    heldout_sequences: int = 16  # lm_loss: held-out sequences of heldout_len tokens
    heldout_len: int = 512
    batch_size: int = 4
    recall_metric: str = "logprob"  # the score of a built-in recall task: "logprob" or "exact_match"
    general_metric: str = "neg_loss"  # the score of lm_loss: "neg_loss" (= -loss) or "accuracy"
    lm_eval_limit: Optional[int] = None  # examples per lm_eval task (None: all)
    seed: int = 1234


RECALL_METRICS = ("logprob", "exact_match")
GENERAL_METRICS = ("neg_loss", "accuracy")


@dataclass
class Task:
    """A named measurement of a model; ``fn(model, tokenizer)`` returns a float or a dict of metrics, and
    ``metric`` says which dict entry is the task's score (higher is better)."""

    name: str
    fn: Callable
    metric: str = "score"

    def __call__(self, model, tokenizer) -> dict[str, float]:
        """Every metric of the task plus its "score"."""
        result = self.fn(model, tokenizer)
        if not isinstance(result, dict):
            return {"score": float(result)}
        if self.metric not in result:
            raise KeyError(f"task {self.name!r} returned metrics {sorted(result)} without {self.metric!r}")
        return {**{k: float(v) for k, v in result.items()}, "score": float(result[self.metric])}


# ---------------------------------------------------------------------------------------------------------
# User tasks
# ---------------------------------------------------------------------------------------------------------

TASK_REGISTRY: dict[str, Callable] = {}


def register_task(name: str, fn: Callable | None = None):
    """Register ``fn(model, tokenizer) -> float | dict`` under ``name``; usable as ``@register_task("name")``."""
    if fn is None:
        return lambda f: register_task(name, f)
    if name in BUILTIN_TASKS or name.startswith("lm_eval:"):
        raise ValueError(f"task name {name!r} is taken by a built-in task; choose another")
    TASK_REGISTRY[name] = fn
    return fn


def lm_eval_task(task_name: str, *, metric: str | None = None, limit: int | None = None, batch_size: int = 1):
    """A task that runs lm-evaluation-harness's ``task_name`` on the model (through its HFLM wrapper) and scores
    it by ``metric`` (default: acc_norm, else acc, else exact_match)."""

    def run(model, tokenizer) -> dict[str, float]:
        try:
            import lm_eval
            from lm_eval.models.huggingface import HFLM
        except ImportError as err:
            raise ImportError(f"task 'lm_eval:{task_name}' needs lm-evaluation-harness: pip install lm-eval") from err
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=[task_name], limit=limit)["results"][task_name]
        metrics = {k: float(v) for k, v in results.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        candidates = [metric] if metric else ["acc_norm,none", "acc,none", "exact_match,none"]
        key = next((k for k in candidates if k in metrics), None)
        if key is None:
            raise KeyError(f"lm_eval task {task_name!r} reported {sorted(metrics)}, none of {candidates}")
        return {**metrics, "score": metrics[key]}

    return run


# ---------------------------------------------------------------------------------------------------------
# Recall tasks
# ---------------------------------------------------------------------------------------------------------

@dataclass
class RecallExample:
    ids: list[int]  # the whole prompt, answers included, BOS first
    answers: list[tuple[int, int]]  # [start, end) of every scored answer in ids


def _assemble(tokenizer, pieces: list[tuple[list[int], bool]]) -> RecallExample:
    """Concatenate token pieces after BOS; pieces marked True are answers."""
    ids, answers = [tokenizer.bos_token_id], []
    for piece, is_answer in pieces:
        if is_answer:
            answers.append((len(ids), len(ids) + len(piece)))
        ids += piece
    return RecallExample(ids, answers)


class _Encoder:
    """Tokenizer.encode without special tokens, memoised (filler sentences repeat)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.cache[text]


def _budget(context_len: int, used: int, task: str) -> int:
    left = context_len - used
    if left <= 0:
        raise ValueError(f"tasks.context_len = {context_len} leaves no room for the filler of task {task!r} "
                         f"(its fixed text takes {used} tokens); raise tasks.context_len")
    return left


PASSKEY_INTRO = ("There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about it.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def passkey_examples(tokenizer, num_examples: int, context_len: int, seed: int) -> list[RecallExample]:
    """The pass key at a random depth of repeated filler; the prompt ends with "The pass key is"."""
    rng, encode, examples = random.Random(seed), _Encoder(tokenizer), []
    for _ in range(num_examples):
        key = str(rng.randint(10000, 99999))
        line = encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
        question, answer = encode(" What is the pass key? The pass key is"), encode(f" {key}")
        used = 1 + len(encode(PASSKEY_INTRO)) + len(line) + len(question) + len(answer)
        repeats = max(1, _budget(context_len, used, "passkey") // len(encode(PASSKEY_FILLER)))
        depth = rng.randint(0, repeats)
        fillers = [(encode(PASSKEY_FILLER), False)]
        pieces = [(encode(PASSKEY_INTRO), False)] + fillers * depth + [(line, False)] + fillers * (repeats - depth)
        examples.append(_assemble(tokenizer, pieces + [(question, False), (answer, True)]))
    return examples


NEEDLE_KEYS = ("apple", "river", "violin", "garden", "copper", "lantern", "harbor", "meadow", "falcon", "marble",
               "canyon", "pepper", "island", "orchid", "thunder", "velvet")


def _sentences(documents: list[str]) -> list[str]:
    return [s for doc in documents for s in re.split(r"(?<=[.!?])\s+", doc) if s]


def needle_examples(tokenizer, documents: list[str], num_examples: int, context_len: int,
                    seed: int) -> list[RecallExample]:
    """A needle sentence at evenly spaced depths 0 .. 1 of a haystack of held-out sentences (whole sentences,
    from a random start)."""
    rng, encode, examples = random.Random(seed), _Encoder(tokenizer), []
    sentences = _sentences(documents)
    if not sentences:
        raise ValueError("the needle task needs held-out text for its haystack; the held-out documents are empty")
    for j in range(num_examples):
        key, number = rng.choice(NEEDLE_KEYS), str(rng.randint(1000000, 9999999))
        needle = encode(f" The special magic number for {key} is {number}.")
        question = encode(f" What is the special magic number for {key}? The special magic number for {key} is")
        answer = encode(f" {number}")
        budget = _budget(context_len, 1 + len(needle) + len(question) + len(answer), "needle")
        haystack, start = [], rng.randrange(len(sentences))
        while True:
            sentence = encode(" " + sentences[(start + len(haystack)) % len(sentences)])
            if sum(map(len, haystack)) + len(sentence) > budget and haystack:
                break
            haystack.append(sentence)
        depth = j / (num_examples - 1) if num_examples > 1 else 0.5
        at = round(depth * len(haystack))
        pieces = [(s, False) for s in haystack[:at]] + [(needle, False)] + [(s, False) for s in haystack[at:]]
        examples.append(_assemble(tokenizer, pieces + [(question, False), (answer, True)]))
    return examples


def hidden_fact_examples(tokenizer, documents: list[str], num_examples: int, context_len: int, depth: float,
                         seed: int, *, task: str = "passkey", num_keys: int = 4) -> list[RecallExample]:
    """Retrieval at a fixed depth of a haystack of held-out sentences (for evaluation by length and depth).

    task "passkey": a 5-digit pass key sentence at ``depth``; the prompt ends with "The pass key is".
    task "multikey": ``num_keys`` needles "The special magic number for K is N." with different keys; the one
    asked for sits at ``depth``, the others at random depths. ``depth`` is 0 (start) .. 1 (end of the haystack).
    """
    if task not in ("passkey", "multikey"):
        raise ValueError(f"hidden_fact_examples: task {task!r}; expected 'passkey' or 'multikey'")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"hidden_fact_examples: depth {depth} must be in [0, 1]")
    rng, encode, examples = random.Random(seed), _Encoder(tokenizer), []
    sentences = _sentences(documents)
    if not sentences:
        raise ValueError("hidden_fact_examples needs held-out text for its haystack; the documents are empty")
    for _ in range(num_examples):
        if task == "passkey":
            key = str(rng.randint(10000, 99999))
            needles = [encode(f" The pass key is {key}. Remember it. {key} is the pass key.")]
            question, answer = encode(" What is the pass key? The pass key is"), encode(f" {key}")
        else:
            keys = rng.sample(NEEDLE_KEYS, num_keys)
            numbers = [str(rng.randint(1000000, 9999999)) for _ in keys]
            needles = [encode(f" The special magic number for {k} is {n}.") for k, n in zip(keys, numbers)]
            question = encode(f" What is the special magic number for {keys[0]}? The special magic number for "
                              f"{keys[0]} is")
            answer = encode(f" {numbers[0]}")
        used = 1 + sum(map(len, needles)) + len(question) + len(answer)
        budget = _budget(context_len, used, task)
        haystack, start, size = [], rng.randrange(len(sentences)), 0
        while True:
            sentence = encode(" " + sentences[(start + len(haystack)) % len(sentences)])
            if size + len(sentence) > budget and haystack:
                break
            haystack.append(sentence)
            size += len(sentence)
        pieces = [(s, False) for s in haystack]
        # the asked needle at `depth`; distractors at random places (inserted back to front: indices stay valid)
        inserts = [(round(depth * len(haystack)), 1, needles[0])]
        inserts += [(rng.randint(0, len(haystack)), 0, n) for n in needles[1:]]
        for at, _, needle in sorted(inserts, key=lambda x: (x[0], x[1]), reverse=True):
            pieces.insert(at, (needle, False))
        examples.append(_assemble(tokenizer, pieces + [(question, False), (answer, True)]))
    return examples


_SYLLABLES = ("ka", "lo", "mi", "be", "tu", "sa", "ra", "no", "vi", "de", "po", "lu", "ze", "fa", "gi", "ho")


def kv_recall_examples(tokenizer, num_examples: int, context_len: int, seed: int,
                       num_queries: int = 4) -> list[RecallExample]:
    """Lines "key: value" (made-up 4-syllable keys, 4-digit values) filling the context, then ``num_queries`` of
    the keys again, each followed by its value: every value asked for is one answer."""
    rng, encode, examples = random.Random(seed), _Encoder(tokenizer), []
    intro, recall = encode("Remember these keys and their values.\n"), encode("Now recall the values.\n")
    for _ in range(num_examples):
        pairs, used, seen = [], 1 + len(intro) + len(recall), set()
        while True:
            key = "".join(rng.choice(_SYLLABLES) for _ in range(4))  # 16^4 keys: room for long contexts
            if key in seen:
                continue
            line = (encode(f"{key}:"), encode(f" {rng.randint(1000, 9999)}"), encode("\n"))
            size = sum(map(len, line))
            if len(pairs) >= num_queries and used + size * (1 + num_queries) > context_len:
                break  # (the queries at the end take about one line each)
            seen.add(key)
            pairs.append(line)
            used += size
        queries = rng.sample(pairs, num_queries)
        pieces = [(intro, False)] + [(p, False) for line in pairs for p in line] + [(recall, False)]
        pieces += [piece for k, v, nl in queries for piece in ((k, False), (v, True), (nl, False))]
        examples.append(_assemble(tokenizer, pieces))
    return examples


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def score_answers(model, examples: list[RecallExample], batch_size: int, pad_id: int) -> dict[str, float]:
    """Teacher-forced answer metrics: {"logprob": mean over answers of the mean answer-token log-probability,
    "exact_match": fraction of answers whose every token is the argmax}. Batches are right-padded, which no
    causal model can see from the real positions, so no attention mask is needed (a lightning layer's state
    would absorb left padding)."""
    device = next(model.parameters()).device
    logprobs, matches = [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        length = max(len(e.ids) for e in batch)
        ids = torch.full((len(batch), length), pad_id, dtype=torch.int64)
        for row, example in enumerate(batch):
            ids[row, : len(example.ids)] = torch.tensor(example.ids)
        logits = model(input_ids=ids.to(device)).logits.float()
        for row, example in enumerate(batch):
            for a, b in example.answers:
                targets = ids[row, a:b].to(device)
                predicted = logits[row, a - 1 : b - 1]  # position t predicts token t + 1
                logprobs.append(F.log_softmax(predicted, dim=-1).gather(-1, targets[:, None]).mean().item())
                matches.append(float(bool((predicted.argmax(-1) == targets).all())))
    return {"logprob": sum(logprobs) / len(logprobs), "exact_match": sum(matches) / len(matches)}


class RecallTask:
    """Pre-generated recall examples, scored by ``score_answers``."""

    def __init__(self, examples: list[RecallExample], batch_size: int, pad_id: int):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id

    def __call__(self, model, tokenizer) -> dict[str, float]:
        return score_answers(model, self.examples, self.batch_size, self.pad_id)


# ---------------------------------------------------------------------------------------------------------
# General ability
# ---------------------------------------------------------------------------------------------------------

class HeldoutLoss:
    """Next-token cross-entropy and accuracy on held-out text cut into sequences of ``seq_len`` tokens."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, num_sequences: int, batch_size: int):
        n = min(num_sequences, tokens.numel() // seq_len)
        if n == 0:
            raise ValueError(f"the held-out text has {tokens.numel()} tokens, fewer than one sequence of "
                             f"tasks.heldout_len = {seq_len}; lower it or add text")
        self.sequences, self.batch_size = tokens[: n * seq_len].view(n, seq_len), batch_size

    @torch.no_grad()
    def __call__(self, model, tokenizer) -> dict[str, float]:
        device = next(model.parameters()).device
        loss_sum, correct, count = 0.0, 0, 0
        for batch in self.sequences.split(self.batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits.float()[:, :-1]
            targets = batch[:, 1:]
            loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                        reduction="sum").item()
            correct += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
        loss = loss_sum / count
        return {"loss": loss, "neg_loss": -loss, "accuracy": correct / count}


# ---------------------------------------------------------------------------------------------------------
# Building the task lists
# ---------------------------------------------------------------------------------------------------------

RECALL_BUILDERS = {"passkey", "needle", "kv_recall"}
BUILTIN_TASKS = RECALL_BUILDERS | {"lm_loss"}


def _builtin_task(name: str, config: TaskConfig, tokenizer, corpus: Corpus) -> Task:
    # each task gets its own seed, so that adding or removing a task does not change the others' examples
    seed = config.seed + sorted(BUILTIN_TASKS).index(name)
    args = (config.num_examples, config.context_len, seed)
    if name == "passkey":
        examples = passkey_examples(tokenizer, *args)
    elif name == "needle":
        examples = needle_examples(tokenizer, corpus.heldout_documents, *args)
    elif name == "kv_recall":
        examples = kv_recall_examples(tokenizer, *args)
    else:
        loss = HeldoutLoss(corpus.heldout_tokens, config.heldout_len, config.heldout_sequences, config.batch_size)
        return Task(name, loss, config.general_metric)
    return Task(name, RecallTask(examples, config.batch_size, _pad_id(tokenizer)), config.recall_metric)


def build_task(name: str, config: TaskConfig, tokenizer, corpus: Corpus) -> Task:
    """A task by name: built in, ``lm_eval:<task>``, or registered with ``register_task``."""
    if name in BUILTIN_TASKS:
        return _builtin_task(name, config, tokenizer, corpus)
    if name.startswith("lm_eval:"):
        return Task(name, lm_eval_task(name.removeprefix("lm_eval:"), limit=config.lm_eval_limit,
                                       batch_size=config.batch_size))
    if name in TASK_REGISTRY:
        return Task(name, TASK_REGISTRY[name])
    raise KeyError(f"unknown task {name!r} (tasks.recall / tasks.general); built in: {sorted(BUILTIN_TASKS)}, "
                   f"registered: {sorted(TASK_REGISTRY)}, or lm_eval:<task>. Register your own with "
                   "sala_train.layer_selection.register_task in a module listed in import_modules")


def build_tasks(config: TaskConfig, tokenizer, corpus: Corpus) -> tuple[list[Task], list[Task]]:
    """(recall tasks, general tasks) of ``config``, their examples generated once."""
    if config.recall_metric not in RECALL_METRICS:
        raise ValueError(f"tasks.recall_metric = {config.recall_metric!r}; expected one of {RECALL_METRICS}")
    if config.general_metric not in GENERAL_METRICS:
        raise ValueError(f"tasks.general_metric = {config.general_metric!r}; expected one of {GENERAL_METRICS}")
    if not config.recall or not config.general:
        raise ValueError("tasks.recall and tasks.general each need at least one task (HALO scores recall drop "
                         "against general drop)")
    return ([build_task(n, config, tokenizer, corpus) for n in config.recall],
            [build_task(n, config, tokenizer, corpus) for n in config.general])
