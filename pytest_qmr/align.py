"""Format alignment (the paper's first stage): LoRA SFT on step-structured solutions.

A small model must first learn to answer as numbered steps ending in "The answer is N."
before quantization damage, first faulty steps or restoration can be seen at all.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import arith
from .errors import QmrError
from .fsutil import atomic_directory, atomic_write_json, sha256_text


@dataclass
class AlignConfig:
    """Settings of one alignment run (trl-style: one dataclass per trainer)."""

    n_train: int = 3000
    min_steps: int = 2
    max_steps: int = 4
    seed: int = 0
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    learning_rate: float = 1e-3
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 10
    max_minutes: float = 40.0
    max_train_steps: int = -1
    # Continue training this LoRA adapter (its rank and targets win over lora_r/target_modules):
    # a CPU budget spent on an earlier alignment is not thrown away when the data changes.
    init_adapter: str = ""
    # What the completions look like: "steps" (numbered steps, then the answer line) or "think" (the same
    # steps as paragraphs inside <think> ... </think>, the answer line after it: the lab reasoning model)
    format: str = "steps"


def arith_sft_rows(config: AlignConfig) -> list[dict]:
    """Conversational prompt/completion rows (trl computes the loss on the completion only)."""
    if config.format not in COMPLETION_FORMATS:
        raise QmrError(f"qmr align: --set format={config.format}: not one of {', '.join(COMPLETION_FORMATS)}")
    problems = arith.generate("train", config.n_train, config.seed, config.min_steps, config.max_steps)
    return [
        {
            "prompt": [{"role": "user", "content": arith.prompt(p.question)}],
            "completion": [{"role": "assistant", "content": COMPLETION_FORMATS[config.format](p)}],
        }
        for p in problems
    ]


COMPLETION_FORMATS = {
    "steps": arith.ArithProblem.solution,
    "think": arith.ArithProblem.think_solution,
}


def stop_after(minutes: float):
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        """Wall-clock budget: CPU training is planned in minutes, not epochs."""

        def __init__(self) -> None:
            self.start = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() - self.start > minutes * 60:
                control.should_training_stop = True
            return control

    return StopAfter()


@contextlib.contextmanager
def scoring_completions_only():
    """Let trl's fused LM head project only the completion positions on CPU too.

    trl scores only the labelled positions on Triton devices and every position elsewhere, so that
    Neuron compiles one tile shape per batch. A CPU compiles nothing, and here the prompt is most of
    each row: projecting its ~130 positions through the 49k-row head made a lab DPO step 38% slower
    (11.5 s vs 7.1 s on 2 cores) for the same losses, and SFT on prompt-completion rows masks its
    prompts alike. Restored on exit; a trl without the switch keeps its own behaviour."""
    from trl.trainer import utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def align(model_path: Path, out: Path, config: AlignConfig, rows: list[dict] | None = None) -> dict:
    """Train a LoRA adapter on ``model_path`` and write it (atomically) to ``out``."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from .engines.devices import trainer_device_args
    from .models import load

    torch.manual_seed(config.seed)
    model, tokenizer = load(model_path)
    previous = None
    if config.init_adapter:
        from peft import PeftModel

        init = Path(config.init_adapter)
        if not (init / "adapter_config.json").is_file():
            from .models import ModelError

            raise ModelError(f"init_adapter {init}: no adapter_config.json there")
        model = PeftModel.from_pretrained(model, init, is_trainable=True)
        card_file = init / "qmr_card.json"
        previous = json.loads(card_file.read_text()) if card_file.is_file() else {}
    rows = rows if rows is not None else arith_sft_rows(config)
    data_hash = sha256_text(json.dumps(rows, sort_keys=True))[:16]
    started = time.monotonic()
    with atomic_directory(out) as scratch:
        args = SFTConfig(
            output_dir=str(scratch / "trainer"),
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum,
            learning_rate=config.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=config.warmup_steps,
            num_train_epochs=config.epochs,
            max_steps=config.max_train_steps,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            seed=config.seed,
            max_length=512,
            gradient_checkpointing=False,
            dataloader_num_workers=0,
            **trainer_device_args(),  # the CPU in fp32, or the visible GPU in bf16
        )
        peft_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            task_type="CAUSAL_LM",
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=None if previous is not None else peft_config,
            callbacks=[stop_after(config.max_minutes)],
        )
        with scoring_completions_only():
            trainer.train()
        trainer.model.save_pretrained(scratch, safe_serialization=True)
        minutes = (time.monotonic() - started) / 60
        history = [h for h in trainer.state.log_history if "loss" in h]
        card = {
            "base": str(model_path.name),
            "config": asdict(config),
            "train_rows": len(rows),
            "data_sha256": data_hash,
            "steps": trainer.state.global_step,
            "minutes": round(minutes, 2),
            "final_loss": history[-1]["loss"] if history else None,
        }
        if previous is not None:  # the loaded adapter's shape, not AlignConfig's unused lora_* defaults
            lora = trainer.model.peft_config["default"]
            card["config"].update(lora_r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                  target_modules=sorted(lora.target_modules))
            card["continued_from"] = previous
        atomic_write_json(scratch / "qmr_card.json", card)
        import shutil

        shutil.rmtree(scratch / "trainer", ignore_errors=True)
    return card


def compress_adapter(src: Path, out: Path, rank: int, dtype: str = "float16") -> dict:
    """Truncate every LoRA update B·A to its best rank-``rank`` approximation (exact SVD through
    QR of the factors) and store it in ``dtype``: the committed adapter stays a few MB.

    Returns the fraction of each update's Frobenius energy kept (min / mean over modules)."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(src / "adapter_model.safetensors")
    compressed, kept = {}, []
    for key_a in [k for k in tensors if k.endswith("lora_A.weight")]:
        key_b = key_a.replace("lora_A", "lora_B")
        a, b = tensors[key_a].double(), tensors[key_b].double() * scale
        q_b, r_b = torch.linalg.qr(b)
        q_a, r_a = torch.linalg.qr(a.T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)
        kept.append(float((s[:rank] ** 2).sum() / (s ** 2).sum()))
        root = s[:rank].sqrt()
        compressed[key_b] = ((q_b @ u[:, :rank]) * root).to(getattr(torch, dtype)).contiguous()
        compressed[key_a] = (root[:, None] * (vh[:rank] @ q_a.T)).to(getattr(torch, dtype)).contiguous()
    config.update(r=rank, lora_alpha=rank)
    with atomic_directory(out) as scratch:
        save_file(compressed, scratch / "adapter_model.safetensors", metadata={"format": "pt"})
        (scratch / "adapter_config.json").write_text(json.dumps(config, indent=2))
        card_file = src / "qmr_card.json"
        card = json.loads(card_file.read_text()) if card_file.is_file() else {}
        card["compressed"] = {"rank": rank, "dtype": dtype, "energy_kept_min": round(min(kept), 4),
                              "energy_kept_mean": round(sum(kept) / len(kept), 4)}
        atomic_write_json(scratch / "qmr_card.json", card)
    return card["compressed"]
