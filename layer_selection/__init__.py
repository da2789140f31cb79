"""sala_train.layer_selection: the layer plan and HALO layer selection (SPEC 5).

    plan.py      LayerPlan: which layer is sparse, which lightning (+ the evidence behind it)
    align.py     lightning students from the teacher's layers; stage-1 alignment (resumable, DDP)
    corpus.py    the alignment text and the held-out documents of the tasks
    tasks.py     recall tasks (passkey, needle, key-value) and held-out LM loss; user / lm-eval tasks
    halo.py      the sweep, importance scores, selection and baselines; run_halo, the whole pipeline
    plot.py      the per-layer chart
"""

from .align import AlignConfig, AlignmentResumeError, align_students, build_students, save_students
from .corpus import Corpus, load_corpus
from .halo import (
    DataConfig,
    HaloConfig,
    SelectionConfig,
    importance_scores,
    run_halo,
    select_plan,
    student_in_place,
    sweep,
)
from .plan import LIGHTNING, MIXER_TYPE, SPARSE, LayerPlan, LayerPlanError
from .tasks import TASK_REGISTRY, Task, TaskConfig, build_tasks, lm_eval_task, register_task

__all__ = [
    "LIGHTNING", "MIXER_TYPE", "SPARSE", "LayerPlan", "LayerPlanError",
    "AlignConfig", "AlignmentResumeError", "Corpus", "DataConfig", "HaloConfig", "SelectionConfig", "TASK_REGISTRY",
    "Task", "TaskConfig", "align_students", "build_students", "build_tasks", "importance_scores", "lm_eval_task",
    "load_corpus", "register_task", "run_halo", "save_students", "select_plan", "student_in_place", "sweep",
]
