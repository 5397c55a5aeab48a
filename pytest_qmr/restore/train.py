"""Training: a LoRA adapter on the quantized model with trl's DPOTrainer, and loading it back.

:func:`train_adapter` trains on the **dense copy** of the quantized checkpoint: the frozen base
computes exactly what the quantized checkpoint computes, and the DPO reference is the same model
with the adapter disabled (``ref_model=None``). :class:`RestoreConfig` holds every setting (trl
style: one dataclass per trainer, DPOConfig's names where they exist): ``sft_weight`` mixes in
the NLL of the chosen text (RPO), ``distill_weight`` the token KL from the full-precision model to
the adapter on the chosen rows (the distilling trainer, :func:`_distilling`), ``mode="sft"`` the
SFT baseline. Rejected continuations that were cut lose the EOS trl appends (:func:`drop_cut_eos`).

The adapter is written atomically with ``qmr_card.json`` (settings, pair counts, losses, reward
margins) and only after a reload of it reproduces the trained model's logits. :func:`load_restored`
merges an adapter into the quantized model; :func:`merge_to_dir` writes that merged model.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..fsutil import atomic_directory, atomic_write_json, sha256_text
from ..steps import is_final_answer_line
from .records import PreferencePair, RestoreError


@dataclass
class RestoreConfig:
    """Settings of one Restore run (trl style: one dataclass per trainer; DPOConfig names where
    they exist). ``sft_weight`` > 0 adds trl's ``sft`` loss (NLL on chosen, as RPO does) with that
    weight; ``distill_weight`` > 0 adds the token-level KL from the full-precision model to the
    policy on each chosen row (``distill_scope``: its continuation, or every position, since every
    position carries the quantization error); ``mode="sft"`` trains on the chosen continuations
    alone (the SFT baseline)."""

    mode: str = "dpo"  # "dpo" | "sft"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    sft_weight: float = 0.0
    distill_weight: float = 0.0  # needs the FP model (train_adapter's distill_from)
    distill_scope: str = "completion"  # or "sequence": every attended position of the chosen row
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    epochs: float = 2.0
    max_steps: int = -1
    max_minutes: float = 10.0
    max_length: int = 512
    seed: int = 0
    logging_steps: int = 1
    eos_on_cut_rejected: bool = False  # True: trl's default, an EOS after every rejected continuation

    def __post_init__(self) -> None:
        if self.mode not in ("dpo", "sft"):
            raise RestoreError(f"mode must be dpo or sft, got {self.mode!r}")
        if self.sft_weight < 0:
            raise RestoreError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.distill_weight < 0:
            raise RestoreError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if self.distill_scope not in ("completion", "sequence"):
            raise RestoreError(f"distill_scope must be completion or sequence, got {self.distill_scope!r}")

    def losses(self) -> tuple[list[str], list[float] | None]:
        if self.mode == "sft":
            return ["sft"], None
        if self.sft_weight > 0:
            return [self.loss_type, "sft"], [1.0, self.sft_weight]
        return [self.loss_type], None

    @classmethod
    def from_settings(cls, assignments: Sequence[str]) -> "RestoreConfig":
        """The defaults with ``key=value`` assignments applied in order (the CLI's --set)."""
        config = cls()
        for assignment in assignments:
            config.set(assignment)
        return config

    def set(self, assignment: str) -> None:
        """Apply one ``key=value`` (the CLI's --set)."""
        key, _, value = assignment.partition("=")
        known = {f.name: f for f in fields(self)}
        if key not in known:
            raise RestoreError(f"--set {key}: unknown setting (known: {', '.join(known)})")
        current = getattr(self, key)
        if isinstance(current, list) or key == "target_modules":
            setattr(self, key, value if value == "all-linear" else value.split(","))
        elif isinstance(current, bool):
            setattr(self, key, value.lower() in ("1", "true", "yes"))
        else:
            try:
                setattr(self, key, type(current)(value))
            except ValueError:
                raise RestoreError(f"--set {key}: {value!r} is not a {type(current).__name__}") from None
        self.__post_init__()


def train_adapter(model_path: str | os.PathLike, pairs: Sequence[PreferencePair], config: RestoreConfig,
                  out_dir: str | os.PathLike, *, distill_from: str | os.PathLike | None = None,
                  runtime=None) -> dict[str, Any]:
    """Train a LoRA adapter with trl's DPOTrainer on ``model_path`` (the dense quantized copy: the
    frozen base is the quantized function, the reference is the adapter disabled) and write it
    atomically to ``out_dir`` with ``qmr_card.json``. Returns the card. ``distill_from`` is the
    full-precision model, the teacher of ``config.distill_weight``. ``runtime`` (a
    ``backends.Runtime``; default auto): the CPU in fp32, or the GPU in mixed precision."""
    import shutil

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from ..align import stop_after, scoring_completions_only
    from ..engines.devices import trainer_device_args
    from ..models import load

    if not pairs:
        raise RestoreError("nothing to restore: no preference pairs")
    if config.distill_weight > 0 and distill_from is None:
        raise RestoreError("distill_weight > 0 needs the full-precision model (distill_from / --distill-from)")
    model_path = Path(model_path)
    torch.manual_seed(config.seed)
    model, tokenizer = load(model_path)
    distill = {}
    if config.distill_weight > 0:
        fp_model, _ = load(Path(distill_from))
        distill = {"fp_model": fp_model.eval().requires_grad_(False), "distill_weight": config.distill_weight,
                   "distill_scope": config.distill_scope}
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    loss_type, loss_weights = config.losses()
    started = time.monotonic()
    with atomic_directory(out_dir) as scratch:
        args = DPOConfig(
            output_dir=str(scratch / "trainer"), beta=config.beta, loss_type=loss_type, loss_weights=loss_weights,
            learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type,
            warmup_steps=config.warmup_ratio, per_device_train_batch_size=config.per_device_train_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps, num_train_epochs=config.epochs,
            max_steps=config.max_steps, logging_steps=config.logging_steps, save_strategy="no", report_to=[],
            seed=config.seed, max_length=config.max_length, gradient_checkpointing=False,
            dataloader_num_workers=0, disable_dropout=True, **trainer_device_args(runtime),
        )
        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=config.target_modules, task_type="CAUSAL_LM")
        trainer_class = _distilling(DPOTrainer) if distill else DPOTrainer
        trainer = trainer_class(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer, peft_config=peft_config,
                                callbacks=[stop_after(config.max_minutes)], **distill)
        cut_eos = 0
        if not config.eos_on_cut_rejected:
            trainer.train_dataset, cut_eos = drop_cut_eos(trainer.train_dataset, pairs, tokenizer.eos_token_id)
        with scoring_completions_only():
            trainer.train()
        trainer.model.save_pretrained(scratch, safe_serialization=True)
        save_diff = _check_saved(trainer.model, model_path, scratch, tokenizer, pairs[0].prompt + pairs[0].chosen)
        history = [h for h in trainer.state.log_history if "loss" in h]
        card = {
            "base": str(model_path),
            "config": asdict(config),
            "pairs": len(pairs),
            "pairs_sha256": sha256_text(json.dumps(rows, sort_keys=True))[:16],
            "teachers": dict(Counter(p.teacher for p in pairs)),
            "distill_from": str(distill_from) if distill else None,
            "variants": dict(Counter(p.variant for p in pairs)),
            "cut_rejected_eos_dropped": cut_eos,
            "steps": trainer.state.global_step,
            "minutes": round((time.monotonic() - started) / 60, 2),
            "losses": [round(h["loss"], 5) for h in history],
            "reward_accuracies": [round(h["rewards/accuracies"], 4) for h in history if "rewards/accuracies" in h],
            "reward_margins": [round(h["rewards/margins"], 5) for h in history if "rewards/margins" in h],
            "distill_kl": [round(h["distill_kl"], 5) for h in history if "distill_kl" in h],
            "save_check_max_abs_diff": save_diff,
        }
        atomic_write_json(scratch / "qmr_card.json", card)
        shutil.rmtree(scratch / "trainer", ignore_errors=True)
    card["adapter_path"] = str(out_dir)
    return card


def _distilling(dpo_trainer_class):
    """A DPOTrainer subclass whose loss adds ``distill_weight`` × the mean token KL(FP ‖ policy) over
    the chosen rows (``distill_scope``: their continuation tokens, or every attended position). The
    policy's last hidden states come from trl's own forward pass (a hook on the backbone) and both
    LM heads project only the distilled positions, so distillation costs one no-grad FP backbone
    pass per step, not a second policy pass."""
    import torch
    import torch.nn.functional as F

    class DistillingDPOTrainer(dpo_trainer_class):
        def __init__(self, *args, fp_model, distill_weight: float, distill_scope: str, **kwargs):
            super().__init__(*args, **kwargs)
            self.fp_model, self.distill_weight, self.distill_scope = fp_model, distill_weight, distill_scope

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            causal_lm = self.accelerator.unwrap_model(model).get_base_model()
            hidden: list = []

            def keep_policy_pass(module, args, output):  # the reference pass runs under no_grad
                if torch.is_grad_enabled():
                    hidden.append(output.last_hidden_state)

            handle = causal_lm.base_model.register_forward_hook(keep_policy_pass)
            try:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                handle.remove()
            if not hidden:  # evaluation (no_grad): the DPO loss alone
                return result
            n_chosen = inputs["input_ids"].shape[0] // 2  # trl's batch is [chosen..., rejected...]
            ids, mask = inputs["input_ids"][:n_chosen], inputs["attention_mask"][:n_chosen]
            scope = inputs["completion_mask"] if self.distill_scope == "completion" else mask
            predicts = scope[:n_chosen, 1:].bool()  # positions whose next token is distilled
            student = causal_lm.get_output_embeddings()(hidden[0][:n_chosen, :-1][predicts])
            with torch.no_grad():
                fp_hidden = self.fp_model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                teacher = self.fp_model.get_output_embeddings()(fp_hidden[:, :-1][predicts])
            kl = F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1),
                          log_target=True, reduction="batchmean")
            self._metrics["train"]["distill_kl"].append(kl.item())
            if return_outputs:
                return result[0] + self.distill_weight * kl, result[1]
            return result + self.distill_weight * kl

    return DistillingDPOTrainer


def stopped_by_itself(continuation: str) -> bool:
    """Whether a continuation ends where the model itself would stop: on its final-answer line.
    A cut one (``rejected_scope="step"``) or one that ran into ``max_new_tokens`` does not."""
    lines = [line for line in continuation.splitlines() if line.strip()]
    return bool(lines) and is_final_answer_line(lines[-1].strip())


def drop_cut_eos(dataset, pairs: Sequence[PreferencePair], eos_token_id: int):
    """(dataset, count): trl's tokenized rows with the EOS it appends to every rejected
    continuation removed where that continuation was cut. The model never chose to stop there,
    and DPO would otherwise win its margin by pushing down an EOS it never emits instead of the
    faulty step."""
    cut = {i for i, p in enumerate(pairs) if not stopped_by_itself(p.rejected)}

    def drop(example, index):
        ids = example["rejected_ids"]
        if index in cut and len(ids) > 1 and ids[-1] == eos_token_id:
            ids = ids[:-1]
        return {"rejected_ids": ids}

    before = sum(len(ids) for ids in dataset["rejected_ids"])
    dataset = dataset.map(drop, with_indices=True)
    return dataset, before - sum(len(ids) for ids in dataset["rejected_ids"])


def _check_saved(trained, model_path: Path, saved: Path, tokenizer, probe: str) -> float:
    """Reload the adapter just written onto a fresh base and compare logits with the trained model
    on ``probe``: an adapter that does not reproduce its own training result is never published."""
    import torch
    from peft import PeftModel

    from ..models import load

    ids = tokenizer(probe, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :256]
    trained.eval()
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load(model_path)[0], str(saved)).eval()
        diff = float((reloaded(input_ids=ids).logits - want).abs().max())
    if not diff <= 1e-4:
        raise RestoreError(f"the saved adapter does not reproduce the trained model (max |Δlogit| {diff:.3g})")
    return diff


def load_restored(model_path: str | os.PathLike, adapter_dir: str | os.PathLike, device: str = "cpu",
                  dtype: str = "float32"):
    """(model, tokenizer): the quantized dense model with the adapter merged, a plain model on
    ``device`` in ``dtype`` (default fp32 on the CPU)."""
    from peft import PeftModel

    from ..models import load

    model, tokenizer = load(Path(model_path), device=device, dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.eval()
    return merged, tokenizer


def merge_to_dir(model_path: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the merged model (safetensors + tokenizer) atomically; transformers loads it as is."""
    model, tokenizer = load_restored(model_path, adapter_dir)
    with atomic_directory(out) as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
    return Path(out)

