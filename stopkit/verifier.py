"""Type II pruning (external, learnable): a separate verifier model scores each prefix's text.

At the check, each unfinished path's text (the question and the partial solution decoded so far)
goes through a second model, batched with padding on the chosen device and dtype; the score is a
probability in [0, 1], higher = keep. Three kinds of checkpoint load, all without remote code:

- **Sequence classifier / outcome reward model** (``*ForSequenceClassification``, loaded with
  ``AutoModelForSequenceClassification``): ``num_labels == 2``: softmax(logits)[positive_label]
  (default 1); ``num_labels == 1`` (scalar reward models such as Skywork-Reward or
  Qwen*-ForSequenceClassification RMs on the Hugging Face hub): sigmoid(reward), which keeps
  their order and maps it into [0, 1]. The model pools the sequence itself (last non-pad token
  for decoders, [CLS] for encoders); stopkit pads on the right with the config's pad id (the
  tokenizer's when the config has none; without either, one sequence per forward).
- **Token-classification process reward model** (``*ForTokenClassification`` with 2 labels, e.g.
  TRL ``PRMTrainer`` models): the partial solution is split into steps on ``step_separator``
  (default "\\n\\n"), each step is followed by the step marker, and the score is
  softmax(token logits)[positive_label] at the last token of the LAST marker: the reward of the
  newest step. The marker is ``step_marker`` (default ``<extra_0>`` when the tokenizer has that
  token, else it must be given: TRL's default separator is "\\n").
- **Qwen2.5-Math-PRM** (``Qwen2ForProcessRewardModel``: Qwen2.5-Math-PRM-7B/-72B,
  Qwen2.5-Math-7B-PRM800K and fine-tunes keeping that layout): its ``modeling_qwen2_rm.py`` is
  remote code, so stopkit rebuilds it: the ``Qwen2Model`` backbone (the config's model_type is
  qwen2) and the head ``score = Linear(h, h) -> ReLU -> Linear(h, 2)`` read from the
  checkpoint's ``score.0.*`` / ``score.2.*`` safetensors. Format as in its model card: system
  prompt "Please reason step by step, and put your final answer within \\boxed{}.", the
  question as the user turn, the assistant turn = steps each followed by ``<extra_0>``;
  reward = softmax over the 2 classes at the marker, class 1. Not supported: Qwen2ForRewardModel
  (Qwen2.5-Math-RM-72B, an outcome RM with its own head) and any other checkpoint that needs
  ``trust_remote_code``.

Input text: when the verifier's tokenizer has a chat template (``chat=None`` auto; True / False
force it), the conversation ``[system_prompt], user: question, assistant: solution`` is rendered
with ``add_generation_prompt=False`` and tokenised in one piece without extra special tokens (the
template has them), as Qwen's model card does; offsets locate the solution's tokens. Otherwise a
classifier gets the tokenizer's pair encoding ``(question, solution)`` (e.g. ``[CLS] q [SEP] s
[SEP]``) and a PRM the rows TRL's ``PRMTrainer`` trains on: [bos], the question, then each step
and marker tokenised on their own and concatenated. Inputs longer than ``max_length`` (default:
the tokenizer's / model's limit) lose solution tokens from the LEFT: the question, the template
and the newest reasoning are kept; a question that leaves no room is a ValueError.

Cost: :attr:`Verifier.tokens` counts the verifier's processed tokens (padding excluded) and
:attr:`Verifier.seconds` the wall time of scoring, both cumulative; the paper reports them apart
from the reasoning model's tokens.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from stopkit._checks import check_int
from stopkit.methods import length_limit, model_dtype, model_path, right_pad

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["Verifier", "QWEN_PRM_MARKER", "QWEN_PRM_SYSTEM", "SUPPORTED"]

log = logging.getLogger(__name__)

QWEN_PRM_MARKER = "<extra_0>"
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
SUPPORTED = (
    "supported: a sequence classifier or reward model (*ForSequenceClassification, "
    "num_labels 1 or 2), a token-classification process reward model "
    "(*ForTokenClassification, num_labels 2, with a step marker), or a Qwen2.5-Math-PRM "
    "checkpoint (Qwen2ForProcessRewardModel)"
)
KINDS = ("classifier", "prm")
_BODY = "\x1fSTOPKIT-SOLUTION\x1f"  # stands for the solution while the chat template renders


class _QwenProcessRewardModel(nn.Module):
    """Qwen2ForProcessRewardModel without its remote code: a Qwen2Model and the 2-layer head."""

    def __init__(self, backbone: PreTrainedModel, head: nn.Sequential) -> None:
        super().__init__()
        self.model, self.score = backbone, head
        self.config = backbone.config
        self.config.num_labels = 2  # the head's classes, whatever the config says

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        from transformers.modeling_outputs import TokenClassifierOutput

        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return TokenClassifierOutput(logits=self.score(hidden))


class Verifier:
    """Type II path scorer (module docstring): built once per run, ``score`` per question.

    model: a loaded classifier (``.logits`` [B, num_labels]) or token classifier ([B, T, 2]) with a
    ``config``; tokenizer: its tokenizer; kind: "classifier" or "prm". positive_label: the class
    whose probability is the score; step_marker, step_separator: a PRM's step format;
    system_prompt: a system turn for chat templates (None: none); chat: use the chat template
    (None: when the tokenizer has one); max_length: tokens per input at most (None: the
    tokenizer's / model's limit); batch_size: inputs per forward; name: for tables.
    ``tokens``, ``seconds``: processed tokens and wall seconds, cumulative. Use :meth:`load`.
    """

    method_type = "II"

    def __init__(
        self,
        model: PreTrainedModel | _QwenProcessRewardModel,
        tokenizer: Any,
        *,
        kind: str,
        positive_label: int = 1,
        step_marker: str | None = None,
        step_separator: str = "\n\n",
        system_prompt: str | None = None,
        chat: bool | None = None,
        max_length: int | None = None,
        batch_size: int = 8,
        name: str = "verifier",
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.model, self.tokenizer, self.kind, self.name = model, tokenizer, kind, name
        self.num_labels = model.config.num_labels
        allowed = (1, 2) if kind == "classifier" else (2,)
        if self.num_labels not in allowed:
            raise ValueError(
                f"{name}: a {kind} verifier needs num_labels in {allowed}, the model "
                f"has {self.num_labels}; {SUPPORTED}"
            )
        self.positive_label = check_int("positive_label", positive_label, 0, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        if chat is None:
            chat = bool(getattr(tokenizer, "chat_template", None))
        elif chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{name}: chat=True but the tokenizer has no chat template")
        self.chat, self.system_prompt = chat, system_prompt
        if max_length is None:
            max_length = length_limit(tokenizer, model.config)
            if max_length is None:
                raise ValueError(
                    f"{name}: no length limit in the tokenizer or config; pass max_length"
                )
        self.max_length = check_int("max_length", max_length, 2)
        if not isinstance(step_separator, str) or not step_separator:
            raise ValueError(f"step_separator must be a non-empty str, got {step_separator!r}")
        self.step_separator = step_separator
        self.marker_ids: list[int] = []
        if kind == "prm":
            if step_marker is None:
                if QWEN_PRM_MARKER not in tokenizer.get_vocab():
                    raise ValueError(
                        f"{name}: a token-classification PRM needs step_marker (the "
                        f"text after each step, e.g. '\\n' for TRL's PRMTrainer); "
                        f"the tokenizer has no {QWEN_PRM_MARKER} token"
                    )
                step_marker = QWEN_PRM_MARKER
            self.marker_ids = tokenizer.encode(step_marker, add_special_tokens=False)
            if not self.marker_ids or tokenizer.unk_token_id in self.marker_ids:
                raise ValueError(
                    f"step_marker {step_marker!r} must encode to known tokens, got "
                    f"{self.marker_ids}"
                )
        self.step_marker = step_marker
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if kind == "classifier":
            # the model pools the last token that is not its config's pad id
            if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
                model.config.pad_token_id = tokenizer.pad_token_id
            if model.config.pad_token_id is None:
                log.warning(
                    "%s: no pad token in the config or tokenizer: one sequence per forward", name
                )
                self.batch_size = 1
            else:
                self.pad_id = model.config.pad_token_id
        self.tokens = 0
        self.seconds = 0.0

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        **options: Any,
    ) -> Verifier:
        """Load a verifier from a local path or hub id (no remote code), on ``device`` in ``dtype``
        ("auto" = the checkpoint's, "float32", "float16", "bfloat16" or a torch.dtype).
        ``options``: the keyword arguments of :class:`Verifier` (positive_label, step_marker,
        step_separator, system_prompt, chat, max_length, batch_size). ValueError naming what was
        found for a checkpoint that is neither a classifier nor a reward model."""
        from transformers import (
            AutoConfig,
            AutoModelForSequenceClassification,
            AutoModelForTokenClassification,
            AutoTokenizer,
        )

        path = model_path(path, "verifier model")
        torch_dtype = model_dtype(dtype)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        except (ValueError, KeyError) as e:  # a model_type transformers lacks: remote code only
            first_line = str(e).strip().splitlines()[0]
            raise ValueError(
                f"verifier {path}: transformers cannot read its config without remote "
                f"code ({first_line}); {SUPPORTED}"
            ) from None
        arch = (config.architectures or [None])[0]
        if arch == "Qwen2ForProcessRewardModel":
            model, kind = _load_qwen_prm(path, torch_dtype), "prm"
            options.setdefault("system_prompt", QWEN_PRM_SYSTEM)
        elif arch is not None and arch.endswith(
            ("ForSequenceClassification", "ForTokenClassification")
        ):
            kind = "classifier" if arch.endswith("ForSequenceClassification") else "prm"
            auto = (
                AutoModelForSequenceClassification
                if kind == "classifier"
                else AutoModelForTokenClassification
            )
            model, info = auto.from_pretrained(
                path, dtype=torch_dtype, trust_remote_code=False, output_loading_info=True
            )
            _check_complete(path, arch, info)
        else:
            found = arch or "a config.json without architectures"
            raise ValueError(
                f"verifier {path} is {found} (model_type {config.model_type!r}), not a "
                f"classifier or reward model; {SUPPORTED}"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(
            model.to(device).eval(), tokenizer, kind=kind, name=f"verifier:{path}", **options
        )

    # ---- inputs --------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def encode(self, question: str, solution: str) -> tuple[list[int], int]:
        """(input ids, the position whose token logits give a PRM's score; -1 for a classifier,
        which pools itself) of one (question, partial solution), truncated to max_length."""
        steps = (
            [s.strip() for s in solution.split(self.step_separator)] if self.kind == "prm" else []
        )
        steps = [s for s in steps if s]
        inside: Sequence[int]
        if self.chat:  # the rendered conversation, tokenised in one piece like the model saw it
            marker = self.step_marker or ""  # set for a PRM
            body = (
                solution
                if self.kind == "classifier"
                else "".join(s + marker for s in steps) or marker
            )
            head, tail = self._chat_frame(question)
            enc = self.tokenizer(
                head + body + tail, add_special_tokens=False, return_offsets_mapping=True
            )
            ids = enc["input_ids"]
            inside = [
                i
                for i, (a, _) in enumerate(enc["offset_mapping"])
                if len(head) <= a < len(head) + len(body)
            ]
        elif self.kind == "prm":  # TRL PRMTrainer's rows: [bos] prompt, then each step + marker
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            prompt = bos + self._ids(question)
            ids = prompt + (
                [t for s in steps for t in self._ids(s) + self.marker_ids] or list(self.marker_ids)
            )
            inside = range(len(prompt), len(ids))
        else:  # the tokenizer's pair encoding, e.g. [CLS] question [SEP] solution [SEP]
            enc = self.tokenizer(question, solution)
            ids = enc["input_ids"]
            inside = [i for i, s in enumerate(enc.sequence_ids()) if s == 1]
        # the solution's tokens are ids[first:last]; drop the oldest ones that do not fit
        first, last = (inside[0], inside[-1] + 1) if len(inside) else (len(ids), len(ids))
        excess = len(ids) - self.max_length
        if excess > 0:
            keep_at_least = len(self.marker_ids) if self.kind == "prm" else 1
            if last - first - excess < keep_at_least:
                raise ValueError(
                    f"{self.name}: the question and template take "
                    f"{len(ids) - (last - first)} tokens, leaving no room for the "
                    f"solution within max_length {self.max_length}"
                )
            ids = ids[:first] + ids[first + excess :]
            last -= excess
        return ids, (last - 1 if self.kind == "prm" else -1)

    def _chat_frame(self, question: str) -> tuple[str, str]:
        """The rendered conversation before and after the assistant's text."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": _BODY}]
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False
        )
        if rendered.count(_BODY) != 1:
            raise ValueError(
                f"{self.name}: the chat template does not keep the assistant turn "
                "verbatim; pass chat=False"
            )
        head, tail = rendered.split(_BODY)
        return head, tail

    # ---- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(
        self,
        question: str,
        prefixes: Sequence[str],
        prefix_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[float]:
        """Scores in [0, 1] of ONE question's unfinished paths, higher = keep. ``prefixes``: the
        decoded partial solutions; ``prefix_ids`` (the reasoning model's ids) is unused: the
        verifier has its own tokenizer."""
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        t0 = time.perf_counter()
        encoded = [self.encode(question, p) for p in prefixes]
        scores = [0.0] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # little padding
        device = self.model.device
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            ids, mask = right_pad([encoded[i][0] for i in rows], self.pad_id, device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            if self.kind == "prm":
                at = torch.tensor([encoded[i][1] for i in rows], device=logits.device)
                logits = logits[torch.arange(len(rows), device=logits.device), at]
            if self.num_labels == 1:
                probs = torch.sigmoid(logits[:, 0])
            else:
                probs = torch.softmax(logits, dim=-1)[:, self.positive_label]
            for i, p in zip(rows, probs.cpu().tolist(), strict=True):
                scores[i] = p
            self.tokens += int(mask.sum())
        self.seconds += time.perf_counter() - t0
        return scores


def _check_complete(path: str, arch: str, info: dict) -> None:
    """ValueError when weights were missing from the checkpoint (a head transformers would
    initialise at random would score noise)."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(
            f"verifier {path}: the checkpoint lacks {len(missing)} weight(s) of "
            f"{arch} ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): "
            f"not a trained classifier or reward model; {SUPPORTED}"
        )


def _load_qwen_prm(path: str, dtype: str | torch.dtype) -> _QwenProcessRewardModel:
    """A Qwen2ForProcessRewardModel checkpoint as Qwen2Model + its head, without remote code."""
    from safetensors import safe_open
    from transformers import Qwen2Model
    from transformers.utils import cached_file

    class Qwen2Backbone(Qwen2Model):
        # the head is loaded below; some of these checkpoints still carry an unused lm_head
        _keys_to_ignore_on_load_unexpected = [r"^score\.", r"^lm_head\."]  # noqa: RUF012 (transformers' attribute)

    backbone, info = cast(
        "tuple[Qwen2Model, dict]",
        Qwen2Backbone.from_pretrained(path, dtype=dtype, output_loading_info=True),
    )
    _check_complete(path, "Qwen2ForProcessRewardModel", info)
    index = cached_file(
        path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False
    )
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = {weight_map[k] for k in weight_map if k.startswith("score.")}
    else:
        files = {"model.safetensors"}
    state = {}
    for name in files:
        file = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        if file is None:
            raise ValueError(
                f"verifier {path}: Qwen2ForProcessRewardModel weights must be "
                f"safetensors, {name} not found"
            )
        with safe_open(file, framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable itself
            state.update(
                {k[len("score.") :]: f.get_tensor(k) for k in names if k.startswith("score.")}
            )
    hidden = backbone.config.hidden_size
    head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    expected = set(head.state_dict())
    if set(state) != expected:
        raise ValueError(
            f"verifier {path}: a Qwen2ForProcessRewardModel head has {sorted(expected)} "
            f"under score., the checkpoint has {sorted(state)}"
        )
    head.load_state_dict(state)
    return _QwenProcessRewardModel(backbone, head.to(next(backbone.parameters()).dtype))
