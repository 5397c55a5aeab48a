"""The GPU path end to end in one call, on a machine where nothing can be fetched:

    python benchmarks/gpu_check.py [--device auto|cpu|cuda] [--no-vllm] [--out FILE]

1. a tiny random Llama (2 layers, hidden 128) and a byte-level BPE tokenizer with a chat
   template, both built in process and saved as a safetensors checkpoint;
2. RTN-W4 g64 through pytest-qmr's ``quantize`` (llmcompressor ``oneshot``, which onloads to
   the GPU where one is visible; its ``device`` is recorded);
3. the dense copy evaluated through the hf backend (lm-eval ``HFLM``) on 8 ``qmr_arith`` items
   on the device in its dtype (auto: CUDA in bf16, else the CPU in fp32);
4. the compressed checkpoint through vLLM (``vllm serve``) when a vLLM environment is found
   (``qmr vllm-env`` / ``QMR_VLLM_PYTHON``), else ``"vllm": "absent"``;
5. 2 DPO steps (trl, LoRA) on the device through Restore's ``train_adapter``;
6. sampled answers (issue #35): 4 per item at temperature 0.8 with their own seeds, twice, on hf
   and (when present) vLLM: ``sampled.<engine>.reproduced`` says the rerun gave the same texts,
   ``distinct`` how many different answers an item got on average.

Prints one JSON line (``device``, ``dtype``, ``torch``, ``gpu``, ``quantize``, ``hf``, ``vllm``,
``dpo``, ``sampled``, ``seconds``, ``ok``) and writes it to ``--out`` when given
(``benchmarks/results/gpu_check.json`` is that output from a GPU machine). The model is random:
accuracies mean nothing; that every stage runs on the device, and how fast, is the point.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_checkpoint(out: Path) -> Path:
    """A random 2-layer Llama with an in-process tokenizer, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pytest_qmr import arith

    corpus = [p.question + " " + p.solution() for p in arith.generate("train", 200, 0)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=640, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", bos_token="<|im_start|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=end, pad_token_id=end,
                         bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = end, end
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


class _Host:
    """What the engines use of a session (pytest_qmr.engines.EngineHost): the cache, the server pool."""

    def __init__(self, cache_dir: Path, servers) -> None:
        self.cache_dir, self.servers = cache_dir, servers

    def load(self, path, trust_remote_code, adapter=None, rt=None):
        from pytest_qmr import models

        return models.load(path, trust_remote_code, rt.device, rt.dtype)


def _timed(seconds: dict, name: str):
    class _T:
        def __enter__(self):
            self.t = time.monotonic()

        def __exit__(self, *exc):
            seconds[name] = round(time.monotonic() - self.t, 2)

    return _T()


def sampled(make_lm, tokenizer, api: bool = False, render_prompt=None) -> dict:
    """4 seeded answers per item on 8 items, twice (no cache): the same texts both times?"""
    from pytest_qmr.cache import GenerationCache, caching_lm
    from pytest_qmr.measure import Evaluator, GenerationSettings, doc_item_id
    from pytest_qmr.sampling import sample_seed

    settings = GenerationSettings(max_new_tokens=16, batch_size=8, samples=4, temperature=0.8, top_p=0.95, seed=0)

    def seeder(request, j: int) -> int:
        return sample_seed(settings.seed, doc_item_id(request.doc), j)

    runs = []
    for _ in range(2):
        lm = caching_lm(make_lm, {"gpu_check": "sampled"}, GenerationCache(enabled=False), tokenizer=tokenizer,
                        eager=make_lm() if api else None, api=api, seeder=seeder)
        records = Evaluator(None, None, settings, None, lm=lm, render_prompt=render_prompt).run("qmr_arith", limit=8)
        runs.append([[s["response"] for s in r.samples] for r in records])
    return {"n": len(runs[0]), "k": settings.samples, "reproduced": runs[0] == runs[1],
            "distinct": round(sum(len(set(item)) for item in runs[0]) / max(len(runs[0]), 1), 2)}


def run(device: str = "auto", use_vllm: bool = True) -> dict:
    import torch

    from pytest_qmr import models
    from pytest_qmr.engines import Runtime, Target, runtime
    from pytest_qmr.engines.hf import hf_lm
    from pytest_qmr.engines.servers import ServerPool, vllm_python
    from pytest_qmr.engines.vllm import VllmEngine
    from pytest_qmr.measure import Evaluator, GenerationSettings
    from pytest_qmr.quantize import QuantSpec, quantize
    from pytest_qmr.restore import PreferencePair, RestoreConfig, train_adapter

    rt = runtime(device, "auto", where="gpu_check")
    work = Path(tempfile.mkdtemp(prefix="qmr-gpu-check-"))
    seconds: dict[str, float] = {}
    out: dict = {"device": rt.device, "dtype": rt.dtype, "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with _timed(seconds, "build"):
        fp = models.resolve(str(tiny_checkpoint(work / "tiny")))
    with _timed(seconds, "quantize"):
        qm = quantize(fp.path, fp.fingerprint, QuantSpec(method="rtn", bits=4, group_size=64), work / "cache")
    out["quantize"] = {"scheme": qm.info["recipe"]["scheme"], "device": qm.info.get("device"),
                       "compressed": qm.compressed_path is not None}
    generation = GenerationSettings(max_new_tokens=16, batch_size=8)
    with _timed(seconds, "hf"):
        model, tokenizer = models.load(qm.path, device=rt.device, dtype=rt.dtype)
        lm = hf_lm(model, tokenizer, generation.batch_size, rt.device, rt.dtype)
        records = Evaluator(None, None, generation, None, lm=lm).run("qmr_arith", limit=8)
    out["hf"] = {"n": len(records), "param_device": str(next(model.parameters()).device),
                 "param_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                 "nonempty": sum(bool(r.response.strip()) for r in records)}
    with _timed(seconds, "sampled_hf"):
        out["sampled"] = {"hf": sampled(lambda hf=lm: hf, tokenizer)}
    del model, lm
    out["vllm"] = "absent"
    if use_vllm:
        try:
            python = vllm_python()
        except models.ModelError:
            python = None
        if python is not None:
            host = _Host(work / "cache", ServerPool())
            engine = VllmEngine(host)
            target = Target(path=qm.compressed_path, fingerprint=models.checkpoint_fingerprint(qm.compressed_path),
                            device=rt.device, dtype="bfloat16", batch_size=generation.batch_size,
                            max_new_tokens=generation.max_new_tokens, seed=0, options=(("max_model_len", 1024),),
                            python=python, where="gpu_check")
            try:
                with _timed(seconds, "vllm"):
                    engine.check(target)
                    served_records = Evaluator(None, None, generation, None, lm=engine.start(target),
                                               render_prompt=engine.prompt_renderer(tokenizer)).run("qmr_arith",
                                                                                                   limit=8)
                    served = engine.served(target)
                with _timed(seconds, "sampled_vllm"):
                    out["sampled"]["vllm"] = sampled(lambda: engine.start(target), tokenizer, api=True,
                                                     render_prompt=engine.prompt_renderer(tokenizer))
            finally:
                host.servers.close()
            out["vllm"] = {"n": len(served_records), "engine": served["engine"], "model": served["model"],
                           "agreement_with_hf": sum(a.correct == b.correct for a, b in
                                                    zip(records, served_records, strict=True)) / len(records)}
    pairs = [PreferencePair(r.prompt, r.gold, r.response or "?", r.item_id, None, None, 1, "gold", "all-step")
             for r in records[:4]]
    with _timed(seconds, "dpo"):
        card = train_adapter(qm.path, pairs, RestoreConfig(max_steps=2, per_device_train_batch_size=2,
                                                           logging_steps=1), work / "adapter",
                             runtime=Runtime(rt.device, rt.dtype))
    out["dpo"] = {"steps": card["steps"], "losses": card["losses"], "minutes": card["minutes"]}
    out["seconds"] = seconds
    out["ok"] = (out["hf"]["n"] == 8 and out["hf"]["param_device"].startswith(rt.device.split(":")[0])
                 and card["steps"] == 2 and (out["vllm"] == "absent" or out["vllm"]["n"] == 8)
                 and all(s["reproduced"] and s["n"] == 8 for s in out["sampled"].values()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM stage")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.device, use_vllm=not args.no_vllm)
    line = json.dumps(result, sort_keys=True)
    print(line, flush=True)
    if args.out is not None:
        from pytest_qmr.fsutil import atomic_write_text

        atomic_write_text(args.out, line + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
