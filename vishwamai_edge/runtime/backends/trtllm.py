"""TensorRT-LLM backend, on TensorRT-LLM's Python runtime (`tensorrt_llm.runtime`).

An engine folder (`trtllm-build` output: config.json + rank0.engine, see
export/engine_plan.py) carries no tokenizer, so tokens come from the bundle's
tokenizer.json through the `tokenizers` library. Image and audio rows enter through
the prompt table: each row gets a fake token id past the vocabulary (vocab_size,
vocab_size + 1, ...), and the engine looks those ids up in the table instead of
its embedding matrix - what TensorRT-LLM's multimodal runner does
(tensorrt_llm/runtime/multimodal_model_runner.py, `setup_fake_prompts`).

TensorRT-LLM API this targets (v0.12.0-jetson and later; from memory of its sources and
examples/run.py, not checked against them here; confidence in brackets):
- `tensorrt_llm.runtime.ModelRunnerCpp.from_dir(engine_dir, rank=0, max_batch_size=...,
  max_beam_width=..., kv_cache_free_gpu_mem_fraction=...)` [high], and the Python-session
  `ModelRunner.from_dir(engine_dir, rank=0)` [high] as the fallback (runner="python").
- `runner.generate(batch_input_ids=[int32 tensor], max_new_tokens, end_id, pad_id,
  temperature, top_k, top_p, repetition_penalty, presence_penalty, frequency_penalty,
  random_seed, streaming=True, output_sequence_lengths=True, return_dict=True,
  prompt_table=..., prompt_tasks="0")` [high for the names; medium for the penalties on
  ModelRunner]; with streaming it yields dicts whose "output_ids" [batch, beam, len] hold
  the prompt followed by the tokens so far and "sequence_lengths" [batch, beam] [high].
- prompt_table is a (tasks, rows, hidden) tensor and prompt_tasks a comma-separated task
  index per request: ModelRunner's `_prepare_ptuning` unpacks `_, task_vocab_size, hidden =
  prompt_table.size()` [medium]; ModelRunnerCpp builds a PromptTuningConfig per request from
  the task's rows [medium]. One request, one task: (1, rows, hidden) and "0".
- `output_generation_logits=True` returns "generation_logits" [batch, beam, steps, vocab] when
  the engine was built with --gather_generation_logits [medium]; `logits()` needs it.
Not mapped: min_p (no such sampling option in v0.12) and penalty_last_n (TensorRT-LLM
penalises the whole sequence). A reply stopped early on a second end-of-generation token
abandons the runner's generator; the request may run on in the executor until it ends.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BundleError, ContextOverflowError, InputError, MissingDependencyError, UserError
from . import MIN_CTX, Cancelled, MemoryUse, SamplingParams, Segment, TokenSegment

ENGINE_FILE = "rank0.engine"
# end-of-turn tokens of the families we ship, besides the tokenizer's own eos
EOG_NAMES = {"</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>"}


class TrtLlmMissingError(MissingDependencyError):
    def __init__(self) -> None:
        UserError.__init__(
            self,
            "tensorrt_llm is not installed; on a Jetson run the vishwamai-edge image built with "
            "`--build-arg WITH_TRTLLM=1` (Dockerfile.l4t), on x86-64 install NVIDIA's wheel: "
            "pip install tensorrt_llm --extra-index-url https://pypi.nvidia.com",
        )


def prompt_table(
    segments: Sequence[Segment], vocab_size: int, hidden: int | None = None
) -> tuple[list[int], np.ndarray | None]:
    """Token ids of the whole prompt, embedding rows replaced by fake ids vocab_size, vocab_size+1,
    ... in order, and those rows stacked into a (rows, hidden) float16 table (None without any)."""
    ids: list[int] = []
    rows: list[np.ndarray] = []
    n_rows = 0
    for seg in segments:
        if isinstance(seg, TokenSegment):
            toks = [int(t) for t in seg.tokens]
            bad = [t for t in toks if not 0 <= t < vocab_size]
            if bad:  # an id past the vocabulary would read a prompt-table row instead
                raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
            ids.extend(toks)
            continue
        emb = np.asarray(seg.embeddings)
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be (n, hidden), got shape {emb.shape}")
        if hidden is None:
            hidden = int(emb.shape[1])
        if emb.shape[1] != hidden:
            raise ValueError(f"embeddings must be (n, {hidden}), got {emb.shape}")
        ids.extend(range(vocab_size + n_rows, vocab_size + n_rows + emb.shape[0]))
        rows.append(emb)
        n_rows += emb.shape[0]
    if not n_rows:
        return ids, None
    with np.errstate(over="ignore"):  # checked just below, with a message of ours
        table = np.concatenate(rows).astype(np.float16)
    if not np.isfinite(table).all():
        raise ValueError("embedding rows overflow float16 (the engine's dtype)")
    return ids, table


def _import_tensorrt_llm():
    try:
        return importlib.import_module("tensorrt_llm")
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] != "tensorrt_llm":
            raise  # installed but broken (a missing libnvinfer, say): show it
        raise TrtLlmMissingError() from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object")
    return data


def _engine_dir(path: Path) -> Path:
    return path.parent if path.is_file() else path


def _find_tokenizer(engine_dir: Path, tokenizer: Path | str | None) -> Path:
    if tokenizer is not None:
        candidates = [Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)]
    else:
        candidates = [d / "tokenizer.json" for d in (engine_dir, engine_dir.parent, engine_dir.parent / "tokenizer")]
    for c in candidates:
        if c.is_file():
            return c
    raise BundleError(f"no tokenizer.json for the engine {engine_dir} (looked at {', '.join(map(str, candidates))})")


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE token shows -> the byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TrtLlmBackend:
    batched = False  # one request at a time here (the engine's in-flight batching is not driven)

    @classmethod
    def check(cls, parallel: int, kv_type: str | None, speculative: bool) -> None:
        if speculative:
            raise InputError("speculative decoding needs the llama.cpp backend, not trtllm; use --speculative off")
        if parallel != 1:
            raise InputError("the trtllm backend runs one request at a time here; use --parallel 1")
        if kv_type is not None:
            raise InputError("--kv-type is a llama.cpp setting; the trtllm backend sets its cache at engine build")

    def __init__(self, torch, runner, engine_dir: Path, engine_config: dict[str, Any], tokenizer, tok_dir: Path,
                 n_ctx: int, context_bytes: int = 0):
        pretrained = engine_config.get("pretrained_config", {})
        build = engine_config.get("build_config", {})
        self._torch = torch
        self._runner = runner
        self.path = engine_dir
        self._tok = tokenizer
        self.n_ctx = n_ctx
        self.n_embd: int = int(pretrained["hidden_size"])
        self.n_vocab: int = int(pretrained["vocab_size"])
        self.max_table_rows: int = int(build.get("max_prompt_embedding_table_size", 0) or 0)
        self._gathers_logits = bool(build.get("gather_generation_logits", False))
        self._context_bytes = context_bytes
        self._ids: list[int] = []  # prompt (+ reply so far) as the engine sees it, fake ids included
        self._table: np.ndarray | None = None
        self._cache: dict[int, bytes] = {}

        config = tok_dir / "tokenizer_config.json"
        self._tok_config = _read_json(config) if config.is_file() else {}
        gen = tok_dir / "generation_config.json"
        gen_config = _read_json(gen) if gen.is_file() else {}
        spec = json.loads(tokenizer.to_str())
        self._byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        self._byte_map = _bytes_to_unicode() if self._byte_level else {}
        self._specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        eog = {t["id"] for t in spec.get("added_tokens", []) if t.get("content") in EOG_NAMES}
        gen_eos = gen_config.get("eos_token_id")
        eog.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else [])
        eos = self.special_token("eos")
        if eos is not None:
            eog.add(eos[0])
        self._eog = eog
        self.end_id = eos[0] if eos is not None else (min(eog) if eog else self.n_vocab - 1)
        pad = self._token_id(self._tok_config.get("pad_token"))
        self.pad_id = pad if pad is not None else self.end_id

    @classmethod
    def load(
        cls,
        path: Path | str,
        n_ctx: int | None = None,
        n_threads: int | None = None,  # noqa: ARG003 - the GPU does the work
        tokenizer: Path | str | None = None,
        runner: str = "auto",
        kv_cache_free_gpu_mem_fraction: float | None = None,
    ) -> TrtLlmBackend:
        tensorrt_llm = _import_tensorrt_llm()
        torch = importlib.import_module("torch")  # a dependency of tensorrt_llm itself
        engine_dir = _engine_dir(Path(path))
        config_path = engine_dir / "config.json"
        if not config_path.is_file() or not (engine_dir / ENGINE_FILE).is_file():
            raise BundleError(f"{engine_dir} is not a TensorRT-LLM engine folder (config.json and {ENGINE_FILE})")
        engine_config = _read_json(config_path)
        try:
            max_seq_len = int(engine_config["build_config"]["max_seq_len"])
            pretrained = engine_config["pretrained_config"]
            int(pretrained["hidden_size"]), int(pretrained["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{config_path} lacks {exc} (not a trtllm-build engine config?)") from None
        # the engine fixes the longest sequence; a larger request gets what it was built for
        n_ctx = min(n_ctx or max_seq_len, max_seq_len)
        if n_ctx < MIN_CTX:
            raise InputError(f"the context length must be at least {MIN_CTX} tokens, got {n_ctx}")
        tok_path = _find_tokenizer(engine_dir, tokenizer)
        tokenizers = importlib.import_module("tokenizers")
        tok = tokenizers.Tokenizer.from_file(str(tok_path))

        plan_path = engine_dir.parent / "plan.json"  # export/engine_plan.py writes it next to the engine
        plan = _read_json(plan_path) if plan_path.is_file() else {}
        fraction = kv_cache_free_gpu_mem_fraction or plan.get("kv_cache_free_gpu_mem_fraction")
        rt = tensorrt_llm.runtime
        use_cpp = runner == "cpp" or (runner == "auto" and hasattr(rt, "ModelRunnerCpp"))
        if runner not in ("auto", "cpp", "python"):
            raise InputError(f"runner must be auto, cpp or python, got {runner!r}")
        if use_cpp:
            kwargs: dict[str, Any] = {"rank": 0, "max_batch_size": 1, "max_beam_width": 1}
            if fraction:
                kwargs["kv_cache_free_gpu_mem_fraction"] = float(fraction)
            model_runner = rt.ModelRunnerCpp.from_dir(engine_dir=str(engine_dir), **kwargs)
        else:
            model_runner = rt.ModelRunner.from_dir(engine_dir=str(engine_dir), rank=0)
        context_bytes = int(float(plan.get("kv_cache_budget_gb", 0)) * 1e9)
        return cls(torch, model_runner, engine_dir, engine_config, tok, tok_path.parent, n_ctx, context_bytes)

    # -- tokens ------------------------------------------------------------------------
    def _token_id(self, token: Any) -> int | None:
        text = token.get("content") if isinstance(token, dict) else token
        return self._tok.token_to_id(text) if isinstance(text, str) else None

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        tok = self._tok
        if hasattr(tok, "encode_special_tokens"):  # tokenizers >= 0.15: special tokens as plain text
            tok.encode_special_tokens = not parse_special
        return list(tok.encode(text, add_special_tokens=add_special).ids)

    def special_texts(self) -> frozenset[str]:
        return frozenset(filter(None, (self._tok.id_to_token(t) for t in self._specials)))

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        key = token if not special else -1 - token
        if key in self._cache:
            return self._cache[key]
        known = 0 <= token < self._tok.get_vocab_size(with_added_tokens=True)
        piece = self._tok.id_to_token(token) if known else None
        if piece is None or (token in self._specials and not special):
            out = b""  # fake prompt-table ids, padding rows, control tokens: nothing to show
        elif token in self._specials:
            out = piece.encode("utf-8")
        elif self._byte_level:
            out = bytes(self._byte_map[c] for c in piece) if all(c in self._byte_map for c in piece) else piece.encode()
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out = bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
        else:
            out = piece.replace("\u2581", " ").encode("utf-8")
        self._cache[key] = out
        return out

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def special_token(self, kind: str) -> tuple[int, str] | None:
        token = self._tok_config.get({"bos": "bos_token", "eos": "eos_token"}[kind])
        tid = self._token_id(token)
        if tid is None:
            return None
        return tid, token.get("content") if isinstance(token, dict) else token

    def chat_template(self) -> str | None:
        tmpl = self._tok_config.get("chat_template")
        if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
            tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
        return tmpl if isinstance(tmpl, str) else None

    # -- evaluation --------------------------------------------------------------------
    def prefill(self, segments: Sequence[Segment], abort: Callable[[], bool] | None = None) -> None:
        """TensorRT-LLM evaluates the prompt inside `generate`, so this checks and keeps it; the
        context phase runs when `stream` starts (or `logits` is asked)."""
        ids, table = prompt_table(segments, self.n_vocab, self.n_embd)
        if not ids:
            raise ContextOverflowError("the prompt is empty")
        if len(ids) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(ids)} tokens but the context holds {self.n_ctx}; "
                "shorten it or rebuild the engine with a larger max_seq_len"
            )
        if table is not None and table.shape[0] > self.max_table_rows:
            raise InputError(
                f"the prompt has {table.shape[0]} image/audio rows but the engine's prompt table holds "
                f"{self.max_table_rows}; send fewer images or rebuild with a larger --max_multimodal_len"
            )
        if abort is not None and abort():
            raise Cancelled()
        self._ids, self._table = ids, table

    def reset(self) -> None:
        self._ids, self._table = [], None

    def generate_kwargs(self, sampling: SamplingParams, max_new_tokens: int, streaming: bool) -> dict[str, Any]:
        """The arguments of `runner.generate` for the kept prompt (one request, one beam)."""
        torch = self._torch
        kwargs: dict[str, Any] = {
            "batch_input_ids": [torch.tensor(self._ids, dtype=torch.int32)],
            "max_new_tokens": max_new_tokens,
            "end_id": self.end_id,
            "pad_id": self.pad_id,
            "streaming": streaming,
            "output_sequence_lengths": True,
            "return_dict": True,
        }
        if sampling.temperature <= 0:
            kwargs.update(temperature=1.0, top_k=1, top_p=0.0)  # greedy, as TensorRT-LLM spells it
        else:
            kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                          random_seed=sampling.seed)
        if sampling.has_penalties:
            kwargs.update(repetition_penalty=sampling.repeat_penalty, presence_penalty=sampling.presence_penalty,
                          frequency_penalty=sampling.frequency_penalty)
        if self._table is not None:
            table = torch.from_numpy(np.ascontiguousarray(self._table[None]))  # (1 task, rows, hidden)
            kwargs.update(prompt_table=table.cuda() if torch.cuda.is_available() else table, prompt_tasks="0")
        return kwargs

    def stream(self, sampling: SamplingParams, max_tokens: int) -> Iterator[int]:
        if not self._ids:
            raise InputError("nothing to continue: prefill a prompt first")
        budget = min(max_tokens, self.n_ctx - len(self._ids))
        if budget <= 0:
            return  # context full: the caller reports finish_reason "length"
        start = len(self._ids)
        outputs = self._runner.generate(**self.generate_kwargs(sampling, budget, streaming=True))
        emitted = 0
        try:
            for out in outputs:
                seq = _first(out["output_ids"])
                end = int(_first(out["sequence_lengths"])) if "sequence_lengths" in out else len(seq)
                for tok in seq[start + emitted:end]:
                    tok = int(tok)
                    if self.is_eog(tok):
                        return
                    emitted += 1
                    self._ids.append(tok)  # the next prefill of the same conversation starts from here
                    yield tok
                    if emitted >= budget:
                        return
        finally:
            close = getattr(outputs, "close", None)
            if close is not None:
                close()

    def logits(self) -> np.ndarray:
        if not self._gathers_logits:
            raise UserError(
                f"the engine {self.path} was built without --gather_generation_logits, so it returns no "
                "logits; rebuild it with that flag (engine_plan gather_generation_logits=True)"
            )
        if not self._ids:
            raise InputError("no prompt evaluated: prefill one first")
        kwargs = self.generate_kwargs(SamplingParams(), 1, streaming=False)
        out = self._runner.generate(**kwargs, output_generation_logits=True)
        logits = out["generation_logits"]
        logits = logits.float().cpu().numpy() if hasattr(logits, "cpu") else np.asarray(logits, dtype=np.float32)
        return np.asarray(logits, dtype=np.float32).reshape(-1, logits.shape[-1])[0][: self.n_vocab].copy()

    @property
    def n_past(self) -> int:
        return len(self._ids)

    # -- resources ---------------------------------------------------------------------
    def memory(self) -> MemoryUse:
        import psutil

        return MemoryUse(
            model_bytes=(self.path / ENGINE_FILE).stat().st_size,
            context_bytes=self._context_bytes,  # the planned KV budget: the runtime reserves it at load
            process_rss_bytes=psutil.Process().memory_info().rss,
        )

    def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            for name in ("shutdown", "close"):  # ModelRunnerCpp's executor, where it has one
                fn = getattr(runner, name, None)
                if callable(fn):
                    fn()
                    break


def _first(x: Any) -> Any:
    """[batch][beam] -> the first request's first beam, for torch tensors, numpy arrays or lists."""
    x = x.tolist() if hasattr(x, "tolist") else x
    return x[0][0]
