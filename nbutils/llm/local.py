"""The local backend: a causal LM run in this process with transformers (`nbutils.llm.contract`).

`LocalBackend` explains by chat generation and simulates all at once: one forward pass per excerpt yields,
at every token's value slot, the exact probability of every label 0..10.

Labels that take two tokens (SmolLM2 writes "10" as "1", "0") are computed exactly. Each slot also gets a
*branch* token "1" placed at the slot's position that sees only the text before the slot; its output
gives P("0" | "1"), so P(label 10) = P("1") * P("0" | "1") and P(label 1) = P("1") * (1 - P("0" | "1")).
Branch tokens ride in the same forward pass through a custom attention mask, so the cost stays one pass.

The shared prompt prefix (instructions, worked examples, explanation) is run once per explanation and its
key/value cache reused for every excerpt; excerpts are batched. Detection and fuzzing items (`judge`) run the
same way, reading P("1") against P("0") at each item's answer slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from nbutils.core.errors import UserError
from nbutils.llm.contract import (
    Backend,
    BackendSpec,
    ExplainRequest,
    Judgements,
    JudgeRequest,
    SimulationRequest,
    Usage,
)
from nbutils.llm.prompts import (
    LABELS,
    JudgeItem,
    explanation_prefix,
    judge_piece,
    judge_prefix,
    simulation_lines,
    simulation_prefix,
)
from nbutils.subject.loading import SubjectModel, load_subject_model


@dataclass
class LabelPlan:
    """How the labels 0..10 map to tokens: first tokens, and the second token of two-token labels."""

    first: list[int]
    second: list[int | None]
    branch_tokens: list[int] = field(default_factory=list)

    @classmethod
    def for_tokenizer(cls, tokenizer) -> LabelPlan:
        first, second = [], []
        for label in LABELS:
            ids = tokenizer(label, add_special_tokens=False)["input_ids"]
            if not 1 <= len(ids) <= 2:
                raise UserError(
                    f"The simulator's tokenizer writes the label {label!r} as {len(ids)} tokens; only 1 or 2 are supported.",
                    "Use a simulator model whose tokenizer writes numbers in at most two tokens.",
                )
            first.append(ids[0])
            second.append(ids[1] if len(ids) == 2 else None)
        branches = sorted({f for f, s in zip(first, second) if s is not None})
        return cls(first, second, branches)

    def distribution(self, first_logp: torch.Tensor, branch_logp: torch.Tensor | None) -> torch.Tensor:
        """[slots, 11] label probabilities from log-probs at the slot [slots, V] and after each branch [slots, nb, V]."""
        p_first = first_logp.exp()
        cols = []
        for f, s in zip(self.first, self.second):
            p = p_first[:, f]
            if f in self.branch_tokens:
                after = branch_logp[:, self.branch_tokens.index(f)].exp()
                seconds = [s2 for f2, s2 in zip(self.first, self.second) if f2 == f and s2 is not None]
                p = p * (after[:, s] if s is not None else 1.0 - after[:, seconds].sum(-1))
            cols.append(p)
        probs = torch.stack(cols, dim=-1)
        return probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)


class LocalBackend(Backend):
    """A causal LM run in this process with transformers (default: the embedded SmolLM2-135M-Instruct)."""

    name = "local"

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> LocalBackend:
        return cls(spec.model, **spec.options)

    def __init__(self, model: str | SubjectModel = "embedded", batch_size: int = 8) -> None:
        """``model``: a spec for `load_subject_model`, or an already loaded `SubjectModel` (on any device)."""
        self.subject = model if isinstance(model, SubjectModel) else load_subject_model(model)
        self.model_name = self.subject.spec
        self.model, self.tokenizer = self.subject.model, self.subject.tokenizer
        self.device = next(self.model.parameters()).device
        self.batch_size = batch_size
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.labels = LabelPlan.for_tokenizer(self.tokenizer)
        self.usage = Usage()
        self._encode = lru_cache(maxsize=100_000)(self._encode_uncached)

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    # -- the contract ----------------------------------------------------------------------------------------

    def explain(self, request: ExplainRequest) -> list[str]:
        messages = self.explanation_messages(request)
        return self.chat(messages, request.n, request.temperature, seed=request.seed, noun=request.noun)

    def simulate(self, request: SimulationRequest) -> list[np.ndarray]:
        prefix = simulation_prefix(request.explanation, self.simulation_examples(request), request.noun)
        return self.simulate_prompt(prefix, request.excerpts)

    def judge(self, request: JudgeRequest) -> Judgements:
        if not request.items:
            return Judgements(np.zeros(0))
        prefix = judge_prefix(request.task, request.explanation, self.judge_examples(request), request.noun)
        return Judgements(self.judge_prompt(prefix, request.items))

    # -- generation --------------------------------------------------------------------------------------

    def chat(
        self, messages: list[dict[str, str]], n: int = 1, temperature: float = 1.0, max_tokens: int = 40, seed: int = 0,
        noun: str = "neuron",
    ) -> list[str]:  # fmt: skip
        """n replies to a chat, each continuing `explanation_prefix` (the explainer's completion format)."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prefix = explanation_prefix(noun)
        ids = torch.tensor([self._encode(prompt + prefix)], device=self.device)
        if ids.shape[1] + max_tokens > self.context:
            raise UserError(
                f"The explanation prompt has {ids.shape[1]} tokens; with {max_tokens} to generate it exceeds the "
                f"model's context of {self.context}.",
                "Show fewer or shorter excerpts to the explainer, or use a model with a longer context.",
            )
        torch.manual_seed(seed)
        sample = temperature > 0
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=None,
                top_k=None,
                num_return_sequences=n,
                max_new_tokens=max_tokens,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                stop_strings=["\n"],  # the explanation is one line
                tokenizer=self.tokenizer,
            )
        replies = [self.tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]
        self.usage.add(Usage(n, ids.shape[1] * n, sum(len(row) - ids.shape[1] for row in out)))
        return [prefix + r for r in replies]

    # -- all-at-once simulation ------------------------------------------------------------------------

    def _excerpt_ids(self, tokens: Sequence[str]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        slots: list[int] = []
        for before, after in simulation_lines(tokens):
            ids += self._encode(before)
            slots.append(len(ids))
            ids += self._encode(after)
        return ids, slots

    def _batch_inputs(
        self,
        parts: list[tuple[list[int], list[int]]],
        prefix_len: int,
        prefix_ids: list[int] | None,
        branches: list[int],
    ):
        """Token ids, position ids and additive attention mask for excerpts plus branch tokens.

        With ``prefix_ids`` the prefix is part of each row (no cache); otherwise the prefix is a cache of
        length ``prefix_len`` that every row attends to.
        """
        own = prefix_ids if prefix_ids is not None else []
        rows = []
        for ids, slots in parts:
            seq = own + ids + [b for _ in slots for b in branches]
            pos = list(range(len(own) + len(ids)))
            pos += [len(own) + s for s in slots for _ in branches]
            rows.append((seq, pos, len(own) + len(ids), slots))
        width = max(len(r[0]) for r in rows)
        B = len(rows)
        kv = (0 if prefix_ids is not None else prefix_len) + width
        off = kv - width  # key index of query 0
        allow = torch.zeros(B, width, kv, dtype=torch.bool)
        ids_t = torch.zeros(B, width, dtype=torch.long)
        pos_t = torch.zeros(B, width, dtype=torch.long)
        for b, (seq, pos, main_len, slots) in enumerate(rows):
            ids_t[b, : len(seq)] = torch.tensor(seq)
            pos_t[b, : len(seq)] = torch.tensor(pos) + (0 if prefix_ids is not None else prefix_len)
            allow[b, :, :off] = True  # the cached prefix
            allow[b, :main_len, off : off + main_len] = torch.tril(torch.ones(main_len, main_len, dtype=torch.bool))
            q = main_len
            for s in slots:
                for _ in branches:
                    allow[b, q, off : off + len(own) + s] = True  # the text before the slot ...
                    allow[b, q, off + q] = True  # ... and itself
                    q += 1
            for pad in range(len(seq), width):
                allow[b, pad, off + pad] = True  # padding sees itself only (no fully masked rows)
        mask = torch.zeros(B, 1, width, kv, dtype=self.model.dtype)
        mask.masked_fill_(~allow.unsqueeze(1), torch.finfo(self.model.dtype).min)
        return ids_t.to(self.device), pos_t.to(self.device), mask.to(self.device), rows

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on some positions' final hidden states (with Gemma's logit soft-capping, if any)."""
        logits = self.model.get_output_embeddings()(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _distributions(self, hidden: torch.Tensor, rows, own_len: int) -> list[np.ndarray]:
        """Label distributions from the final hidden states [B, W, H], running the LM head only at the value
        slots and branch tokens (about 40% of positions; the full [B, W, vocab] logits are never built)."""
        out = []
        nb = len(self.labels.branch_tokens)
        for b, (_seq, _pos, main_len, slots) in enumerate(rows):
            at = torch.tensor([own_len + s - 1 for s in slots], device=hidden.device)
            first = torch.log_softmax(self._logits(hidden[b, at]), dim=-1)
            branch = None
            if nb:
                branch = torch.log_softmax(self._logits(hidden[b, main_len : main_len + len(slots) * nb]), dim=-1)
                branch = branch.reshape(len(slots), nb, -1)
            out.append(self.labels.distribution(first, branch).cpu().numpy())
        return out

    def simulate_prompt(
        self, prefix: str, excerpts: Sequence[Sequence[str]], reuse_prefix: bool = True
    ) -> list[np.ndarray]:
        """Per excerpt, a [tokens, 11] array of label probabilities at each token's value slot, after a given
        prompt prefix (``reuse_prefix=False``: every excerpt with its own copy of the prefix, for comparison)."""
        parts = [self._excerpt_ids(tokens) for tokens in excerpts]
        return self._forward_parts(prefix, parts, self.labels.branch_tokens, self._distributions, reuse_prefix)

    def judge_prompt(self, prefix: str, items: Sequence[JudgeItem], reuse_prefix: bool = True) -> np.ndarray:
        """P(answer "1") against "0" at each item's answer slot (detection and fuzzing), one pass per item."""
        parts = []
        for item in items:
            ids = list(self._encode(judge_piece(item)))
            parts.append((ids, [len(ids)]))
        yes_no = [self.labels.first[1], self.labels.first[0]]

        def read(hidden: torch.Tensor, rows, own_len: int) -> list[float]:
            at = torch.tensor([own_len + r[3][0] - 1 for r in rows], device=hidden.device)
            logits = self._logits(hidden[torch.arange(len(rows), device=hidden.device), at])[:, yes_no]
            return torch.softmax(logits, dim=-1)[:, 0].tolist()

        return np.array(self._forward_parts(prefix, parts, [], read, reuse_prefix), dtype=np.float64)

    def _forward_parts(self, prefix: str, parts, branches: list[int], read, reuse_prefix: bool) -> list:
        """Run every (ids, slots) part after the shared prefix in batches; ``read(hidden, rows, own_len)``
        turns a batch's final hidden states into results. The prefix runs once and its cache is reused."""
        from transformers import DynamicCache

        prefix_ids = list(self._encode(prefix))
        longest = len(prefix_ids) + max(len(ids) + len(s) * len(branches) for ids, s in parts)
        if longest > self.context:
            raise UserError(
                f"The prompt needs {longest} positions; the simulator's context is {self.context}.",
                "Use shorter excerpts or fewer worked examples, or a simulator with a longer context.",
            )
        results: list = []
        with torch.inference_mode():
            cache = None
            if reuse_prefix:
                pre = self.model.base_model(input_ids=torch.tensor([prefix_ids], device=self.device), use_cache=True)
                cache = pre.past_key_values.to_legacy_cache()
                self.usage.add(Usage(1, len(prefix_ids), 0))
            for start in range(0, len(parts), self.batch_size):
                chunk = parts[start : start + self.batch_size]
                if reuse_prefix:
                    ids, pos, mask, rows = self._batch_inputs(chunk, len(prefix_ids), None, branches)
                    B = len(chunk)
                    past = DynamicCache.from_legacy_cache(
                        tuple(
                            (k.expand(B, -1, -1, -1).contiguous(), v.expand(B, -1, -1, -1).contiguous())
                            for k, v in cache
                        )
                    )
                    hidden = self.model.base_model(
                        input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=past, use_cache=True
                    ).last_hidden_state
                    results += read(hidden, rows, 0)
                else:
                    ids, pos, mask, rows = self._batch_inputs(chunk, 0, prefix_ids, branches)
                    hidden = self.model.base_model(
                        input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False
                    ).last_hidden_state
                    results += read(hidden, rows, len(prefix_ids))
                self.usage.add(Usage(len(chunk), sum(len(r[0]) for r in rows), 0))
        return results
