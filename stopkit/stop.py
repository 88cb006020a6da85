"""StopScorer: K learned [STOP] tokens + a LoRA adapter + a tiny head that score a path from its
paged KV cache (docs/DESIGN.md section 1).

One learned vector e in R^d is repeated over ``num_tokens`` positions l..l+K-1 after a prefix of
length l. The [STOP] pass runs every layer of the frozen model with LoRA on ``q_proj``/``v_proj``
(keys use the base ``k_proj``), each layer's attention reading the row's cached prefix (the base
model's own K/V, never written). The final-layer hidden state of the LAST [STOP] token goes
through the model's final norm and ``Linear(d, 2)`` (or a one-hidden-layer MLP); the score is
``softmax(logits)[1]``. At inference the norm and head run as one ``stopkit.ops.stop_score`` call.

How the adapter is attached (the model is never modified): the LoRA factors are this module's own
parameters and are applied by forward hooks on the target Linears that exist only inside
:meth:`StopScorer.adapter` (registered on enter, removed on exit). Outside that context the model
is exactly the model it was: no wrapped layers, no extra work in decoding, bit-identical outputs,
and several scorers can share one model. On disk the adapter is a standard PEFT LoRA adapter
(``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names), loadable by
``peft.PeftModel.from_pretrained``; stopkit reads PEFT adapters (``.safetensors`` or ``.bin``)
with plain LoRA (alpha/r or rsLoRA scaling, per-module ranks) and rejects variants it does not
implement (DoRA, LoRA bias, alpha patterns, modules_to_save) with a clear error.

Layouts ``StopScorer.load`` reads and ``StopScorer.save`` writes (``layout="stopkit"``, the
default, or ``"authors"``, for the authors' code)::

    stopkit:                            authors' release:
      stop_config.json                    assess_token_config.json
      stop.safetensors                    assess_token_embedding.pth
      adapter/classifier/                 classifier_head.pth
        adapter_config.json               adapter/classifier/
        adapter_model.safetensors           adapter_config.json
                                            adapter_model.bin | adapter_model.safetensors
                                          tokenizer/   (optional; not read)

The [STOP] vector of a new scorer starts from the embedding row of ``token_id`` (e.g. a spare
special token of the tokenizer, like the toy's ``[STOP]``) or, by default, from the mean of the
embedding rows: what ``resize_token_embeddings`` gives a newly added token, as the authors did,
without changing the model's vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from stopkit import ops
from stopkit._checks import check_choice, check_int, check_real, check_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from stopkit.engine import Engine, Row, Session

# transformers, peft and stopkit.engine are imported where they are used, so that importing this
# module stays cheap.

__all__ = ["StopScorer", "ADAPTER_NAME", "ASSESS_TOKEN", "LAYOUTS", "OWN_LAYOUT", "AUTHORS_LAYOUT"]

log = logging.getLogger(__name__)

ADAPTER_NAME = "classifier"
ASSESS_TOKEN = "[ASSESS]"  # the authors' default name of their [STOP] token
LAYOUTS = ("stopkit", "authors")
_OWN_FILES = ("stop_config.json", "stop.safetensors")
_AUTHORS_FILES = ("assess_token_config.json", "assess_token_embedding.pth", "classifier_head.pth")
FORMAT = "stopkit.stop"
FORMAT_VERSION = 1
OWN_LAYOUT = (
    "stop_config.json, stop.safetensors (token [d], head.weight [2, d|h], head.bias [2], "
    "optional hidden.weight [h, d], hidden.bias [h]), adapter/classifier/adapter_config.json, "
    "adapter/classifier/adapter_model.safetensors"
)
AUTHORS_LAYOUT = (
    "assess_token_config.json, assess_token_embedding.pth (input_embedding [d]), "
    "classifier_head.pth (weight [2, d], bias [2]), adapter/classifier/adapter_config.json, "
    "adapter/classifier/adapter_model.bin or .safetensors, tokenizer/ (optional)"
)
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False}


def _backbone(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    if backbone is None or not hasattr(backbone, "norm"):
        raise TypeError(
            f"model must be a transformers causal LM with a decoder backbone that has a "
            f"final norm (model.{prefix}.norm), got {type(model).__name__}"
        )
    return backbone


def _cache_kwarg(module: nn.Module) -> str:
    """transformers 5 calls the KV-cache argument ``cache``, 4.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class _Lora(nn.Module):
    """LoRA factors of one Linear of the model: ``out += dropout(x) @ A.T @ B.T * scaling``."""

    def __init__(self, path: str, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.path = path
        self.scaling = float(scaling)
        self.A = nn.Parameter(A)  # [r, in]
        self.B = nn.Parameter(B)  # [out, r]


class StopScorer(nn.Module):
    """Scores reasoning prefixes with K [STOP] tokens read through a LoRA-adapted pass of ``model``.

    Build with :meth:`new` or :meth:`load`, never directly. Parameters (float32, on the model's
    device): ``token`` ``[d]``; ``loras`` (LoRA factors of each target Linear); ``head``
    (``Linear(d, 2)``, or ``hidden`` ``Linear(d, h)`` + activation + ``Linear(h, 2)``). The model
    is referenced, not owned: it is not in ``parameters()`` or ``state_dict()``.
    """

    _model: PreTrainedModel
    _backbone: nn.Module
    loras: Sequence[_Lora]  # an nn.ModuleList

    def __init__(
        self,
        model: nn.Module,
        *,
        num_tokens: int,
        token: torch.Tensor,
        loras: list[_Lora],
        lora_alpha: float,
        use_rslora: bool,
        lora_dropout: float,
        head_weight: torch.Tensor,
        head_bias: torch.Tensor,
        hidden_weight: torch.Tensor | None = None,
        hidden_bias: torch.Tensor | None = None,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # referenced, not a submodule
        object.__setattr__(self, "_backbone", _backbone(model))
        self.num_tokens = check_int("num_tokens", num_tokens, 1, ops.MAX_Q_LEN)
        self.activation = check_choice("activation", activation, _ACTIVATIONS)
        self.lora_alpha, self.use_rslora = float(lora_alpha), bool(use_rslora)
        self.lora_dropout = float(lora_dropout)
        device = next(model.parameters()).device
        self.token = nn.Parameter(token.detach().to(device, torch.float32).clone())
        self.loras = cast(Sequence[_Lora], nn.ModuleList(loras).to(device, torch.float32))
        self.hidden = None if hidden_weight is None else _linear(hidden_weight, hidden_bias, device)
        self.head = _linear(head_weight, head_bias, device)
        self._engine: Engine | None = None
        self.eval()  # inference by default; training calls .train() (LoRA dropout)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def new(
        cls,
        model: nn.Module,
        num_tokens: int = 4,
        lora_rank: int = 64,
        lora_alpha: float | None = None,
        targets: Sequence[str] = ("q_proj", "v_proj"),
        seed: int = 0,
        *,
        lora_dropout: float = 0.05,
        token_id: int | None = None,
        head_hidden: int | None = None,
        activation: str = "gelu",
    ) -> StopScorer:
        """A freshly initialised scorer bound to ``model`` (a transformers causal LM).

        lora_alpha: default ``2 * lora_rank`` (128 at rank 64). targets: names of the Linears that
        get LoRA (every module whose name ends with one). token_id: start the [STOP] vector from
        this embedding row (default: the mean embedding row). head_hidden: a one-hidden-layer MLP
        head of this width (default: ``Linear(d, 2)``). LoRA A is Kaiming-uniform and B zero (so a
        new scorer's adapter is a no-op, as in PEFT); the head is torch's Linear init. Everything is
        drawn from ``seed``; torch's global RNG is left untouched.
        """
        embed = _embeddings(model)
        lora_rank = check_int("lora_rank", lora_rank, 1)
        if lora_alpha is None:
            lora_alpha = 2 * lora_rank
        lora_alpha = check_real("lora_alpha", lora_alpha, 0, low_open=True)
        lora_dropout = check_real("lora_dropout", lora_dropout, 0, 1, high_open=True)
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
            raise TypeError(
                f"targets must be a non-empty sequence of module names, got {targets!r}"
            )
        seed = check_int("seed", seed, 0)
        d = embed.weight.shape[1]
        if token_id is not None:
            token_id = check_int("token_id", token_id, 0, embed.weight.shape[0] - 1)
        if head_hidden is not None:
            head_hidden = check_int("head_hidden", head_hidden, 1)
        found = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] in targets
        ]
        missing = set(targets) - {name.split(".")[-1] for name, _ in found}
        if missing:
            raise ValueError(f"targets {sorted(missing)} match no nn.Linear of the model")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loras = []
            for name, m in found:
                A = torch.empty(lora_rank, m.in_features)
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                loras.append(
                    _Lora(name, A, torch.zeros(m.out_features, lora_rank), lora_alpha / lora_rank)
                )
            hidden = nn.Linear(d, head_hidden) if head_hidden else None
            head = nn.Linear(head_hidden or d, 2)
        with torch.no_grad():
            rows = embed.weight if token_id is None else embed.weight[token_id : token_id + 1]
            token = rows.float().mean(0)
        return cls(
            model,
            num_tokens=num_tokens,
            token=token,
            loras=loras,
            lora_alpha=float(lora_alpha),
            use_rslora=False,
            lora_dropout=float(lora_dropout),
            head_weight=head.weight.data,
            head_bias=head.bias.data,
            hidden_weight=None if hidden is None else hidden.weight.data,
            hidden_bias=None if hidden is None else hidden.bias.data,
            activation=activation,
        )

    @classmethod
    def load(cls, path: str | Path, model: nn.Module) -> StopScorer:
        """Load a scorer saved by :meth:`save` or in the authors' released layout (see the module
        docstring) and bind it to ``model``. Raises FileNotFoundError listing the expected layout
        when a file is missing, ValueError when the checkpoint does not fit the model (e.g. its
        hidden size differs from the model's)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"no StopScorer checkpoint directory at {path}; expected either "
                f"the stopkit layout ({OWN_LAYOUT}) or the authors' layout "
                f"({AUTHORS_LAYOUT})"
            )
        d = _embeddings(model).weight.shape[1]
        if (path / "stop_config.json").is_file():
            parts = _read_own(path)
        elif (path / "assess_token_config.json").is_file() or (
            path / "classifier_head.pth"
        ).is_file():
            parts = _read_authors(path)
        else:
            raise FileNotFoundError(
                f"{path} holds neither stop_config.json (stopkit layout: "
                f"{OWN_LAYOUT}) nor assess_token_config.json (authors' layout: "
                f"{AUTHORS_LAYOUT})"
            )
        first = (
            parts["hidden_weight"] if parts["hidden_weight"] is not None else parts["head_weight"]
        )
        for name, size in (
            ("[STOP] token", parts["token"].numel()),
            ("head input", first.shape[1]),
        ):
            if size != d:
                raise ValueError(
                    f"checkpoint {path} has hidden size {size} ({name}) but the "
                    f"model's hidden size is {d}"
                )
        loras, lora = _read_adapter(parts["adapter_dir"], model)
        return cls(
            model,
            num_tokens=parts["num_tokens"],
            token=parts["token"].reshape(d),
            loras=loras,
            **lora,
            head_weight=parts["head_weight"],
            head_bias=parts["head_bias"],
            hidden_weight=parts["hidden_weight"],
            hidden_bias=parts["hidden_bias"],
            activation=parts["activation"],
        )

    def check_layout(self, layout: str) -> str:
        """``layout`` when :meth:`save` can write this scorer in it; ValueError otherwise."""
        check_choice("layout", layout, LAYOUTS)
        if layout == "authors" and self.hidden is not None:
            raise ValueError(
                f"the authors' layout holds a Linear(d, 2) head only "
                f"(classifier_head.pth), but this scorer's head has a hidden layer "
                f"(head_hidden={self.hidden.out_features}); save it in the stopkit "
                f"layout"
            )
        return layout

    def save(self, path: str | Path, layout: str = "stopkit", *, tokenizer: Any = None) -> None:
        """Write directory ``path`` (created; files overwritten, the other layout's files removed so
        that :meth:`load` reads what was written) in ``layout`` (module docstring):

        - ``"stopkit"``: full precision, any head.
        - ``"authors"``: what the authors' trainer writes, so that their code loads the scorer:
          ``classifier_head.pth`` and ``assess_token_embedding.pth`` in the model's dtype (theirs
          hold the model's dtype; the adapter stays float32 as PEFT keeps it), the assess token
          ``[ASSESS]`` (their default) with ``special_token_id`` its id in ``tokenizer`` (added
          to a copy when missing, written to ``tokenizer/``), or -1 without a tokenizer. Their
          deployment appends ``special_token_id`` to the prefix (and skips scoring when it is -1),
          so pass the model's tokenizer. A head with a hidden layer cannot be written (ValueError).
        """
        self.check_layout(layout)
        path = Path(path)
        adapter_dir = path / "adapter" / ADAPTER_NAME
        adapter_dir.mkdir(parents=True, exist_ok=True)
        for stale in _AUTHORS_FILES if layout == "stopkit" else _OWN_FILES:
            (path / stale).unlink(missing_ok=True)
        # an older .bin beside the new .safetensors would be a second, stale copy of the adapter
        (adapter_dir / "adapter_model.bin").unlink(missing_ok=True)
        self._save_adapter(adapter_dir, task_type=None if layout == "stopkit" else "CAUSAL_LM")
        if layout == "authors":
            self._save_authors(path, tokenizer)
        else:
            own = {
                "token": self.token,
                "head.weight": self.head.weight,
                "head.bias": self.head.bias,
            }
            if self.hidden is not None:
                own.update({"hidden.weight": self.hidden.weight, "hidden.bias": self.hidden.bias})
            save_file(
                {k: v.detach().cpu().float().contiguous() for k, v in own.items()},
                str(path / "stop.safetensors"),
            )
            config = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "hidden_size": self.hidden_size,
                "num_tokens": self.num_tokens,
                "head_hidden": None if self.hidden is None else self.hidden.out_features,
                "activation": self.activation,
                "adapter": f"adapter/{ADAPTER_NAME}",
            }
            (path / "stop_config.json").write_text(json.dumps(config, indent=2) + "\n")
        log.info("saved StopScorer to %s (%s layout)", path, layout)

    def _save_adapter(self, adapter_dir: Path, task_type: str | None) -> None:
        """The LoRA factors as a PEFT adapter (PEFT's config and key names, float32 safetensors)."""
        from peft import LoraConfig

        rank = max(lo.A.shape[0] for lo in self.loras)
        LoraConfig(
            r=rank,
            lora_dropout=self.lora_dropout,
            lora_alpha=self.lora_alpha,  # type: ignore[arg-type]  # PEFT takes floats too
            use_rslora=self.use_rslora,
            task_type=task_type,
            target_modules=sorted({lo.path.split(".")[-1] for lo in self.loras}),
            rank_pattern={lo.path: lo.A.shape[0] for lo in self.loras if lo.A.shape[0] != rank},
            base_model_name_or_path=getattr(self.model.config, "_name_or_path", None) or None,
        ).save_pretrained(str(adapter_dir))
        tensors = {}
        for lo in self.loras:
            tensors[f"base_model.model.{lo.path}.lora_A.weight"] = lo.A.detach().cpu().contiguous()
            tensors[f"base_model.model.{lo.path}.lora_B.weight"] = lo.B.detach().cpu().contiguous()
        save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))

    def _save_authors(self, path: Path, tokenizer: Any) -> None:
        """The authors' head, [STOP] embedding, config and tokenizer files (see :meth:`save`)."""
        dtype = _embeddings(self.model).weight.dtype
        special_token_id = -1
        if tokenizer is not None:
            tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer stays as it is
            if ASSESS_TOKEN not in tokenizer.get_vocab():
                tokenizer.add_tokens([ASSESS_TOKEN])
            special_token_id = int(tokenizer.convert_tokens_to_ids(ASSESS_TOKEN))
            tokenizer.save_pretrained(str(path / "tokenizer"))
        else:
            log.warning(
                "saving the authors' layout without a tokenizer: special_token_id is -1, "
                "and the authors' deployment skips scoring without a token id"
            )
        torch.save(
            {
                "weight": self.head.weight.detach().cpu().to(dtype).contiguous(),
                "bias": self.head.bias.detach().cpu().to(dtype).contiguous(),
            },
            path / "classifier_head.pth",
        )
        torch.save(
            {
                "assess_token": ASSESS_TOKEN,
                "special_token_id": special_token_id,
                "input_embedding": self.token.detach().cpu().to(dtype).contiguous(),
                "output_embedding": None,
            },
            path / "assess_token_embedding.pth",
        )
        config = {
            "assess_token": ASSESS_TOKEN,
            "special_token_id": special_token_id,
            "num_assess_tokens": self.num_tokens,
            "tokenizer_dir": "tokenizer" if tokenizer is not None else None,
            "embedding_path": "assess_token_embedding.pth",
        }
        (path / "assess_token_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # ---- properties -----------------------------------------------------------------------------
    @property
    def model(self) -> PreTrainedModel:
        """The causal LM this scorer is bound to."""
        return self._model

    @property
    def hidden_size(self) -> int:
        return self.token.shape[0]

    # ---- the [STOP] pass ------------------------------------------------------------------------
    @contextlib.contextmanager
    def adapter(self) -> Iterator[None]:
        """Apply the LoRA adapter to the model while inside the context (forward hooks on the target
        Linears, removed on exit). Dropout (``lora_dropout``) applies in training mode only."""
        handles = []
        try:
            for lo in self.loras:  # one at a time: on a failure, the hooks added so far come off
                module = self.model.get_submodule(lo.path)
                handles.append(module.register_forward_hook(self._lora_hook(lo)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _lora_hook(self, lo: _Lora) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = F.dropout(args[0].to(lo.A.dtype), self.lora_dropout, self.training)
            return out + (F.linear(F.linear(x, lo.A), lo.B) * lo.scaling).to(out.dtype)

        return hook

    def suffix_embeds(self, batch: int) -> torch.Tensor:
        """The [STOP] inputs ``[batch, num_tokens, d]`` in the model's dtype (differentiable)."""
        dtype = _embeddings(self.model).weight.dtype
        return self.token.to(dtype)[None, None].expand(batch, self.num_tokens, -1)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Head on final-NORMED hidden states ``[B, d]`` -> float32 logits ``[B, 2]`` (torch;
        differentiable: the training path)."""
        x = hidden.float()
        if self.hidden is not None:
            x = _ACTIVATIONS[self.activation](self.hidden(x))
        return self.head(x)

    def _fused_score(
        self, hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """Final norm + head + softmax on PRE-norm hidden ``[B, d]`` in one ops.stop_score call."""
        h = self.hidden
        return ops.stop_score(
            hidden,
            self.head.weight.detach(),
            self.head.bias.detach(),
            norm_weight=norm_weight.detach().float(),
            eps=eps,
            hidden_weight=None if h is None else h.weight.detach(),
            hidden_bias=None if h is None else h.bias.detach(),
            activation=self.activation,
        )

    def forward(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        """Training forward with plain transformers: logits float32 ``[B, 2]`` of token-id prefixes.

        The prefixes (LEFT-padded, attention-masked, row b at positions ``0 .. l_b - 1``) run once
        through the base model without the adapter and without gradients (use_cache); the [STOP]
        embeddings then run with the adapter against that cache at positions ``l_b .. l_b + K - 1``
        of each row; the last [STOP] token's final-norm hidden state goes through the head.
        Gradients reach token, LoRA and head.

        Left padding, as the authors' trainer does it, keeps every row's last real tokens next to
        its [STOP] tokens: transformers' sliding-window masks and caches count slots, not
        positions, so with right padding a short row's window (gpt-oss, Mistral, Qwen2) would
        cover padding instead of the end of its prefix.
        """
        prefixes = self._check_prefixes(prefixes)
        device = self.token.device
        B, K = len(prefixes), self.num_tokens
        lens = torch.tensor([len(p) for p in prefixes], device=device)
        L = int(lens.max())
        ids = torch.zeros(B, L, dtype=torch.int64)
        for i, p in enumerate(prefixes):
            ids[i, L - len(p) :] = torch.tensor(p)
        ids = ids.to(device)
        pad = (L - lens)[:, None]
        slots = torch.arange(L, device=device)[None]
        mask = (slots >= pad).long()
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        kw = _cache_kwarg(self._backbone)
        with torch.no_grad():
            self._backbone(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(slots - pad).clamp(min=0),
                use_cache=True,
                **{kw: cache},
            )
        positions = lens[:, None] + torch.arange(K, device=device)
        mask = torch.cat([mask, mask.new_ones(B, K)], dim=1)
        with self.adapter():
            out = self._backbone(
                inputs_embeds=self.suffix_embeds(B),
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{kw: cache},
            )
        return self.head_logits(out.last_hidden_state[:, -1])

    # ---- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def score_rows(self, engine: Engine, rows: Sequence[Row]) -> torch.Tensor:
        """Scores float32 ``[len(rows)]`` of running, fully cached engine rows (e.g. every row at
        a check, across requests): one [STOP] pass over their paged prefixes (the cache is read,
        never written; the rows resume unchanged), then one ops.stop_score call."""
        if engine.model is not self.model:
            raise ValueError(
                "the engine runs a different model than the one this scorer is bound to"
            )
        rows = list(rows)
        hidden = engine.forward_suffix(rows, self.suffix_embeds(len(rows)), adapter=self.adapter)
        weight, eps = engine.final_norm_params()
        return self._fused_score(hidden[:, -1], weight, eps)

    @torch.no_grad()
    def score_session(self, session: Session, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Scores float32 ``[len(session.rows)]`` (or ``[len(rows)]``) of the live rows of an engine
        session (:meth:`score_rows` over all of them). ``rows`` selects live row indices of the
        result (the pass itself always covers every live row)."""
        live = session.rows
        if rows is not None:
            rows = [check_int(f"rows[{i}]", r, 0, len(live) - 1) for i, r in enumerate(rows)]
        scores = self.score_rows(session.engine, live)
        return scores if rows is None else scores[torch.tensor(rows, device=scores.device)]

    @torch.no_grad()
    def score(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores float32 ``[B]`` (on the model's device) of token-id prefixes: the prefixes are
        prefilled into a paged cache by the base model (no adapter), then scored by
        :meth:`score_session`."""
        from stopkit.engine import Engine

        prefixes = self._check_prefixes(prefixes)
        if self._engine is None:
            self._engine = Engine(self.model)
        with self._engine.start(prefixes, n=1, seed=0) as session:
            return self.score_session(session)

    def _check_prefixes(self, prefixes: Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prefixes, (str, bytes)) or not isinstance(prefixes, Sequence) or not prefixes:
            raise TypeError(
                f"prefixes must be a non-empty list of token-id lists, got {prefixes!r:.80}"
            )
        V = _embeddings(self.model).weight.shape[0]
        return [check_token_ids(f"prefixes[{i}]", p, V) for i, p in enumerate(prefixes)]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> nn.Linear:
    """An nn.Linear holding float32 copies of weight ``[out, in]`` and bias ``[out]`` (None: no
    bias; built on the meta device: no random init, the global RNG is not touched)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().to(device, torch.float32).clone())
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device, torch.float32).clone())
    return layer


def _embeddings(model: nn.Module) -> nn.Embedding:
    if not isinstance(model, nn.Module) or not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
    return cast(nn.Embedding, cast("PreTrainedModel", model).get_input_embeddings())


# ---- checkpoint readers -------------------------------------------------------------------------
def _need(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}; expected layout: {layout}")
    return path


def _read_json(file: Path) -> dict:
    """The JSON object in ``file``; ValueError naming the file when it is not one."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON (corrupt?): {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def _read_tensors(file: Path) -> dict[str, Any]:
    """What a ``.safetensors`` file or a ``torch.save`` file (tensors only) holds; ValueError naming
    the file when it cannot be read (truncated, corrupt, or not such a file)."""
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as e:
        # torch's and safetensors' messages run to paragraphs: their first sentence says it
        reason = str(e).split(". ")[0].split("\n")[0] or type(e).__name__
        kind = "safetensors" if file.suffix == ".safetensors" else "torch.save"
        raise ValueError(
            f"{file} is not a readable {kind} file (truncated or corrupt?): {reason}"
        ) from e


def _config_int(config: dict, key: str, file: Path) -> int:
    """``config[key]``, an int >= 1; ValueError naming the file (a config's fields are data)."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{file}: {key} must be an int >= 1, got {value!r}")
    return value


def _read_own(path: Path) -> dict:
    config = _read_json(_need(path / "stop_config.json", OWN_LAYOUT))
    if config.get("format") != FORMAT:
        raise ValueError(
            f"{path / 'stop_config.json'} is not a {FORMAT} config (format "
            f"{config.get('format')!r})"
        )
    if config.get("version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer stopkit (format version "
            f"{config['version']} > {FORMAT_VERSION})"
        )
    t = _read_tensors(_need(path / "stop.safetensors", OWN_LAYOUT))
    for key in ("token", "head.weight", "head.bias"):
        if key not in t:
            raise ValueError(
                f"{path / 'stop.safetensors'} lacks tensor {key!r}; expected: {OWN_LAYOUT}"
            )
    adapter_dir = path / config.get("adapter", f"adapter/{ADAPTER_NAME}")
    _need(adapter_dir / "adapter_config.json", OWN_LAYOUT)
    return {
        "num_tokens": _config_int(config, "num_tokens", path / "stop_config.json"),
        "token": t["token"],
        "head_weight": t["head.weight"],
        "head_bias": t["head.bias"],
        "hidden_weight": t.get("hidden.weight"),
        "hidden_bias": t.get("hidden.bias"),
        "activation": config.get("activation", "gelu"),
        "adapter_dir": adapter_dir,
    }


def _read_authors(path: Path) -> dict:
    """The authors' layout. Only ``input_embedding`` of the [STOP] token is used: its output
    embedding (LM-head row) never enters the score, and the tokenizer is not needed because the
    vector is fed as an embedding, not as a token id."""
    config = _read_json(_need(path / "assess_token_config.json", AUTHORS_LAYOUT))
    emb_file = path / "assess_token_embedding.pth"
    if not emb_file.is_file() and config.get("embedding_path"):
        emb_file = path / Path(config["embedding_path"]).name
    emb = _read_tensors(_need(emb_file, AUTHORS_LAYOUT))
    head = _read_tensors(_need(path / "classifier_head.pth", AUTHORS_LAYOUT))
    if not isinstance(emb, dict) or not isinstance(emb.get("input_embedding"), torch.Tensor):
        raise ValueError(f"{emb_file} must hold a dict with an 'input_embedding' tensor [d]")
    if not isinstance(head, dict) or not all(
        isinstance(head.get(k), torch.Tensor) for k in ("weight", "bias")
    ):
        got = sorted(head) if isinstance(head, dict) else type(head).__name__
        raise ValueError(
            f"{path / 'classifier_head.pth'} must hold a Linear state dict "
            f"(weight [2, d], bias [2] tensors), got {got}"
        )
    adapter_dir = path / "adapter" / ADAPTER_NAME
    if (
        not (adapter_dir / "adapter_config.json").is_file()
        and (path / "adapter" / "adapter_config.json").is_file()
    ):
        adapter_dir = path / "adapter"  # saved under PEFT's default adapter name
    _need(adapter_dir / "adapter_config.json", AUTHORS_LAYOUT)
    num_tokens = _config_int(config, "num_assess_tokens", path / "assess_token_config.json")
    return {
        "num_tokens": num_tokens,
        "token": emb["input_embedding"].float().reshape(-1),
        "head_weight": head["weight"].float(),
        "head_bias": head["bias"].float(),
        "hidden_weight": None,
        "hidden_bias": None,
        "activation": "gelu",
        "adapter_dir": adapter_dir,
    }


def _read_adapter(adapter_dir: Path, model: nn.Module) -> tuple[list[_Lora], dict]:
    """LoRA factors of a PEFT adapter directory, validated against ``model``, and its
    (lora_alpha, use_rslora, lora_dropout)."""
    config_file = adapter_dir / "adapter_config.json"
    config = _read_json(config_file)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_file}: peft_type must be LORA, got {config.get('peft_type')!r}")
    for key, ok in _UNSUPPORTED.items():
        if bool(config.get(key, ok)) != ok:
            raise ValueError(f"{config_file}: {key}={config[key]!r} is not supported by stopkit")
    if (
        config.get("bias", "none") != "none"
        or config.get("alpha_pattern")
        or config.get("modules_to_save")
    ):
        raise ValueError(
            f"{config_file}: LoRA bias, alpha_pattern and modules_to_save are not "
            "supported by stopkit"
        )
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).is_file():
            weights_file = adapter_dir / name
            break
    else:
        raise FileNotFoundError(
            f"missing {adapter_dir}/adapter_model.safetensors (or .bin); "
            f"expected layout: {OWN_LAYOUT} or {AUTHORS_LAYOUT}"
        )
    weights = _read_tensors(weights_file)
    if not isinstance(weights, dict):
        raise ValueError(
            f"{weights_file} must hold a dict of LoRA tensors, got {type(weights).__name__}"
        )
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise ValueError(
                f"{weights_file}: unexpected tensor {key!r} (only lora_A / lora_B "
                "weights are supported)"
            )
        factors.setdefault(m.group(1), {})[m.group(2)] = value
    if not factors:
        raise ValueError(f"{weights_file} holds no LoRA weights")
    # PEFT's defaults for keys an older adapter_config.json may lack
    alpha, use_rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
    prefix = getattr(model, "base_model_prefix", "")
    loras = []
    for name, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights_file}: module {name} needs both lora_A and lora_B")
        module, path = None, name
        for candidate in (
            name,
            f"{prefix}.{name}",
        ):  # adapters of the backbone alone omit the prefix
            try:
                module, path = model.get_submodule(candidate), candidate
                break
            except AttributeError:
                continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{weights_file}: adapter module {path} is not an nn.Linear of the model"
            )
        A, B = ab["A"].float(), ab["B"].float()
        r = A.shape[0]
        if A.shape != (r, module.in_features) or B.shape != (module.out_features, r):
            raise ValueError(
                f"{weights_file}: LoRA factors of {path} have shapes A {tuple(A.shape)}, "
                f"B {tuple(B.shape)} but the model's Linear is {module.in_features} -> "
                f"{module.out_features} (hidden size mismatch?)"
            )
        loras.append(_Lora(path, A, B, alpha / (math.sqrt(r) if use_rslora else r)))
    return loras, {
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "lora_dropout": float(config.get("lora_dropout", 0.0)),
    }
