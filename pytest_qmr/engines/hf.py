"""``hf``: transformers in this process — lm-eval's ``HFLM`` on the loaded model object.

The model is loaded through the session (:class:`~pytest_qmr.engines.base.EngineHost.load`: one
model kept in memory, consecutive cells share it) only on a generation-cache miss, batched with
``generation.batch_size``, on ``generation.device`` in ``generation.dtype`` (fp32 on the CPU).
A Restore adapter is merged into the dense copy with peft. Nothing is served, so nothing is
recorded in ``served`` and nothing needs stopping.

Sampled requests (issue #35) carry their own ``seed`` in their generation kwargs
(:func:`pytest_qmr.sampling.sample_seed`). ``HFLM`` would hand that seed to ``generate`` (which
refuses it) and batch only requests with equal kwargs (one request per batch); here they are
batched together and each row samples with its own ``torch.Generator``
(:class:`SeededSampling`): temperature, top-k and top-p are transformers' own warpers, the draw is
the row's, and ``generate`` then runs greedy on the one token left. Row ``r``'s tokens depend on
its seed and its logits only, so a rerun in the same batches regenerates the same texts.
"""

from __future__ import annotations

from typing import Any

from ..registry import ENGINES
from .base import Engine, Target
from .devices import Runtime


class SeededSampling:
    """A transformers logits processor that samples each row with its own generator (see the module
    doc); it returns scores with every token but the drawn one at ``-inf``."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float = 1.0, top_k: int = 0,
                 device: str = "cpu") -> None:
        import torch
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids, scores):
        import torch

        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"{scores.shape[0]} rows for {len(self.generators)} seeds")
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        drawn = torch.stack([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, drawn.to(out.device), 0.0)


def hf_lm(model, tokenizer, batch_size: int, device: str = "cpu", dtype: str = "float32"):
    """lm-eval's ``HFLM`` on an in-memory transformers model, already on ``device`` in ``dtype``;
    requests with a ``seed`` are sampled with it (:class:`SeededSampling`), the others as HFLM does."""
    from lm_eval.models.huggingface import HFLM

    class SeededHFLM(HFLM):
        def generate_until(self, requests, disable_tqdm: bool = False):
            requests = list(requests)
            seeded = [i for i, r in enumerate(requests) if "seed" in r.args[1]]
            if not seeded:
                return super().generate_until(requests, disable_tqdm)
            kinds = {tuple(sorted((k, repr(v)) for k, v in requests[i].args[1].items() if k != "seed"))
                     for i in seeded}
            if len(kinds) > 1:
                raise ValueError("sampled requests of one call must share their generation settings")
            plain = [i for i in range(len(requests)) if i not in set(seeded)]
            out: list[str] = [""] * len(requests)
            for i, text in zip(seeded, self.sampled([requests[i] for i in seeded]), strict=True):
                out[i] = text
            if plain:
                for i, text in zip(plain, super().generate_until([requests[i] for i in plain], disable_tqdm),
                                   strict=True):
                    out[i] = text
            return out

        def sampled(self, requests: list) -> list[str]:
            """``requests`` whose kwargs carry a ``seed``, ``batch_size`` at a time in their order."""
            from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

            out: list[str] = []
            eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
            size = int(self.batch_size)
            for start in range(0, len(requests), size):
                batch = requests[start:start + size]
                kwargs = normalize_gen_kwargs({k: v for k, v in batch[0].args[1].items() if k != "seed"},
                                              self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen_toks = kwargs.pop("max_gen_toks")
                sampler = SeededSampling([r.args[1]["seed"] for r in batch], float(kwargs.get("temperature", 1.0)),
                                         float(kwargs.get("top_p", 1.0)), int(kwargs.get("top_k") or 0),
                                         str(self.device))
                context, mask = self.tok_batch_encode([r.args[0] for r in batch],
                                                      left_truncate_len=self.max_length - max_gen_toks,
                                                      truncation=self.truncation)
                cont = self._model_generate(context=context.to(self.device), attention_mask=mask.to(self.device),
                                            stop=until, max_length=context.shape[1] + max_gen_toks, do_sample=False,
                                            logits_processor=[sampler])
                out += [postprocess_generated_text(generation=self.tok_decode(row[context.shape[1]:]), stop=until,
                                                   think_end_token=None) for row in cont.tolist()]
            return out

    return SeededHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, dtype=dtype)


@ENGINES.register("hf")
class HfEngine(Engine):
    adapters = True

    def identity(self, target: Target) -> dict[str, Any]:
        return {}

    def start(self, target: Target):
        model, tokenizer = self.host.load(target.path, target.trust_remote_code, target.adapter,
                                          Runtime(target.device, target.dtype))
        return hf_lm(model, tokenizer, target.batch_size, target.device, target.dtype)
