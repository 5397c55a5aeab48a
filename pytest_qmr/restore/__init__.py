"""The Restore stage ("Silver Bullet"): preference pairs cut at the first faulty step, DPO with LoRA.

Training problems of the benchmark's training split (:mod:`.problems`, sources registered by task
name in ``registry.PROBLEM_SOURCES``) are answered by the quantized model and each answer is
labelled at its first faulty step (:mod:`.mining`). Every located failure is cut just before
that step (:mod:`.pairs`): the prompt is the problem, chat-formatted exactly as the model saw it,
plus the correct prefix; **rejected** is the quantized model's own continuation from there and
**chosen** a teacher's continuation from the same point (:mod:`.teachers`, registered in
``registry.TEACHERS``: ``gold``, ``fp``, ``endpoint:NAME``), kept only when its final answer
verifies against the gold. Which failures become pairs, and whether they resume at the cut, is
the variant's (:mod:`.variants`, registered in ``registry.RESTORE_VARIANTS``: ``all-step``,
``ce-step`` / ``me-step`` / ``ee-step``, ``all-ns``, ``rand-ns``). A LoRA adapter is then trained
with trl's DPOTrainer on the dense copy of the quantized model (:mod:`.train`), so the frozen base
IS the quantized function and the DPO reference is the same model with the adapter disabled.
Pairs and results are plain records (:mod:`.records`); :mod:`.ablate` is the lab ablation.

Every name other modules use is importable from here (``from pytest_qmr.restore import ...``).
"""

from __future__ import annotations

from .ablate import AblationConfig, ablate, format_table
from .mining import generate_greedy, label_traces, mine_traces
from .pairs import REJECTED_SCOPES, build_pairs, check_leakage, cut_case, first_step_of, select_cases
from .problems import (CHAT_USER, GoldSolution, TrainProblem, arith_problems, chat_prompt, gsm8k_problems,
                       gsm8k_solution, row_prompt, training_problems, user_turn)
from .records import (LeakageError, PreferencePair, RestoreError, RestoreResult, read_pairs, recovered_share,
                      write_pairs)
from .teachers import (CONTINUE_INSTRUCTION, Cut, EndpointTeacher, GoldTeacher, ModelTeacher, Teacher,
                       TeacherOptions, make_teacher, spec_problem, teacher_forms)
from .train import (RestoreConfig, drop_cut_eos, load_restored, merge_to_dir, stopped_by_itself,
                    train_adapter)
from .variants import FINAL_STATUSES, RandomDraw, Variant, get_variant, is_case

__all__ = [
    "CHAT_USER", "CONTINUE_INSTRUCTION", "FINAL_STATUSES", "REJECTED_SCOPES",
    "AblationConfig", "Cut", "EndpointTeacher", "GoldSolution", "GoldTeacher", "LeakageError", "ModelTeacher",
    "PreferencePair", "RandomDraw", "RestoreConfig", "RestoreError", "RestoreResult", "Teacher",
    "TeacherOptions", "TrainProblem", "Variant",
    "ablate", "arith_problems", "build_pairs", "chat_prompt", "check_leakage", "cut_case", "drop_cut_eos",
    "first_step_of", "format_table", "generate_greedy", "get_variant", "gsm8k_problems", "gsm8k_solution",
    "is_case", "label_traces", "load_restored", "make_teacher", "merge_to_dir", "mine_traces", "read_pairs",
    "recovered_share", "row_prompt", "select_cases", "spec_problem", "stopped_by_itself", "teacher_forms",
    "train_adapter", "training_problems", "user_turn", "write_pairs",
]
