"""The lm-evaluation-harness model backend ``odmoe``: any odmoe system behind the harness's ``LM`` interface.

From lm-eval's own command line (``python -m odmoe.eval`` is ``lm_eval`` with this backend registered and
the shipped tasks on its include path)::

    python -m odmoe.eval --model odmoe --model_args system=hobbit,model=tiny-mixtral --tasks kjv_next_verse
    python -m odmoe.eval --model odmoe \\
        --model_args system=odmoe,model=local,model.path=/models/Mixtral-8x7B-v0.1,device=cuda \\
        --tasks hellaswag,arc_challenge

``model_args`` are Hydra overrides of the project's config (``conf/``): ``system`` picks
``conf/system/<name>.yaml``, ``model``/``hardware`` pick those groups, and dotted keys override fields
(``system.t1=2.0``, ``system.shadow.precision=int8``, ``model.path=...``). A few keys belong to the backend:
``max_gen_toks`` (default 256), ``add_bos_token`` (default: the tokenizer's own choice, as lm-eval's ``hf``
backend: Mixtral's adds BOS, the embedded models' adds nothing), ``work_dir`` (OD-MoE's cluster directory; default a temporary one), ``max_logit_mb`` (OD-MoE:
logits saved per cluster launch, default 2000).

From Python (``simple_evaluate`` takes the instance)::

    from odmoe.eval import OdmoeLM
    lm = OdmoeLM.from_args(system="adapmoe", model="tiny-mixtral")
    lm_eval.simple_evaluate(model=lm, tasks=["kjv_next_verse"], task_manager=task_manager())

Requests are batch 1 and greedy, as the paper's systems serve. Loglikelihood: the context (left-truncated
to the model's context) is prefilled and the continuation teacher-forced one token per step
(``odmoe.eval.executors``); ``is_greedy`` compares with the model's argmax. ``generate_until``: every
system decodes ``max_gen_toks`` tokens (its own decoding rule, no sampling) and the text is cut at the first
stop sequence or EOS; the runtime and the engine decode fixed lengths, so no system stops early.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from odmoe.errors import OdmoeError

try:
    import lm_eval.models  # noqa: F401 - lm-eval's own backends first (its registry loads them lazily)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - the optional extra is missing
    raise OdmoeError(
        f"lm-evaluation-harness is not installed ({e}); install the extra: pip install -e '.[eval]'"
    ) from None

from odmoe.eval.executors import Executor, make_executor

BACKEND_KEYS = ("max_gen_toks", "add_bos_token", "work_dir", "max_logit_mb", "batch_size", "max_batch_size")


def compose(system: str = "odmoe", overrides: Mapping[str, Any] | None = None):
    """The project's Hydra config with ``+system=<system>`` and ``key=value`` overrides (``model=...``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from odmoe.paths import repo_root

    def literal(v: Any) -> str:
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    args = [f"+system={system}"] + [f"{k}={literal(v)}" for k, v in (overrides or {}).items()]
    with initialize_config_dir(str(repo_root() / "conf"), version_base="1.3"):
        return hydra_compose("config", args)


@register_model("odmoe")
class OdmoeLM(TemplateLM):
    """lm-eval ``LM`` over one odmoe system (an :class:`~odmoe.eval.executors.Executor`)."""

    def __init__(
        self,
        executor: Executor,
        tokenizer,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        cleanup: Path | None = None,
    ):
        super().__init__()
        self.executor = executor
        self.tokenizer = tokenizer
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self._cleanup = cleanup
        if self.tokenizer.eos_token_id is None:
            raise OdmoeError("the model's tokenizer has no EOS token, which the harness needs as a prefix")

    # ---- construction from lm-eval's model_args ------------------------------------------------
    @classmethod
    def from_args(cls, system: str = "odmoe", **kwargs: Any) -> OdmoeLM:
        """Build the backend from ``model_args`` (Hydra overrides plus the backend keys; module docstring)."""
        from omegaconf import OmegaConf

        from odmoe.models import load_from_cfg

        own = {k: kwargs.pop(k) for k in BACKEND_KEYS if k in kwargs}
        if kwargs.get("device") is None:
            kwargs.pop("device", None)
        cfg = compose(system, kwargs)
        lm = load_from_cfg(cfg)
        cleanup = None
        work_dir = own.get("work_dir")
        if work_dir is None:
            work_dir = cleanup = Path(tempfile.mkdtemp(prefix="odmoe-eval-"))
        system_cfg = OmegaConf.to_container(cfg.system, resolve=True)
        mb = float(own.get("max_logit_mb", 2000))
        executor = make_executor(system, cfg, system_cfg, lm, work_dir, mb * 1e6)
        return cls(
            executor,
            lm.tokenizer,
            int(own.get("max_gen_toks", 256)),
            own.get("add_bos_token"),
            cleanup,
        )

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> OdmoeLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> OdmoeLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls.from_args(**{**arg_dict, **extra})

    # ---- what the harness reads ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        return self.executor.max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "odmoe")).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        return {f"odmoe_{k}": v for k, v in self.executor.info().items()}

    @property
    def prefix_token_id(self) -> int:
        """What an empty context conditions on: BOS, else EOS (as lm-eval's ``hf`` backend)."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``; special tokens as lm-eval's ``hf`` backend adds them (the tokenizer's
        default unless ``add_bos_token`` or the caller says otherwise; never a second BOS)."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        if add_special_tokens is None:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise OdmoeError(
                "this model's tokenizer has no chat template; run the task without --apply_chat_template"
            )
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ---- the three request types -----------------------------------------------------------------
    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context left-truncated so context + continuation fit the model (at least one token kept)."""
        room = self.max_length - len(continuation)
        if room < 1:
            raise OdmoeError(
                f"a continuation of {len(continuation)} tokens leaves no room for context in the model's "
                f"{self.max_length}-token window"
            )
        return context[-room:]

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        pairs = [(tuple(self._fit(list(ctx), list(cont))), tuple(cont)) for _, ctx, cont in requests]
        unique = list(dict.fromkeys(pairs))  # the same (context, continuation) is scored once
        scored = dict(zip(unique, self.executor.score(unique), strict=True))
        out = []
        for (key, _, _), pair in zip(requests, pairs, strict=True):
            answer = scored[pair]
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores, strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        by_length: dict[int, list[int]] = {}
        prompts, stops = [], []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = dict(gen_kwargs or {})
            if kwargs.get("do_sample"):
                raise OdmoeError("odmoe systems decode greedily; run the task without do_sample=true")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            stops.append([*until, self.tok_decode([self.eot_token_id])])
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            if n >= self.max_length:
                raise OdmoeError(f"max_gen_toks={n} leaves no room for a prompt in {self.max_length} tokens")
            prompts.append(self.tok_encode(context)[-(self.max_length - n) :])
            by_length.setdefault(n, []).append(i)
        outputs: list[str] = [""] * len(requests)
        for n, idx in by_length.items():
            for i, tokens in zip(idx, self.executor.generate([prompts[i] for i in idx], n), strict=True):
                if self.eot_token_id in tokens:
                    tokens = tokens[: tokens.index(self.eot_token_id)]
                text = self.tok_decode(tokens)
                for stop in stops[i]:
                    if stop:
                        text = text.split(stop, 1)[0]
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    def close(self) -> None:
        """Uninstall the system's hooks and remove a temporary cluster directory."""
        self.executor.close()
        if self._cleanup is not None:
            from odmoe.eval.executors import remove_work_dir

            remove_work_dir(self._cleanup)
            self._cleanup = None
