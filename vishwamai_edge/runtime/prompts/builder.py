"""The conversation -> the prompt: the chat template, client text kept from posing as control tokens, the
bundle's prompt planner placing the images, and the audio rows at their token."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ...errors import InputError
from ..backends import LLMBackend
from ..chat_template import render_chat
from .base import Prompt

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from ..tools import ToolUse

# Client text holding a control token's string is wrapped in these (Unicode private use) for tokenizing
PROTECT_OPEN, PROTECT_CLOSE = "\ue000", "\ue001"
_PROTECTED = re.compile(f"[{PROTECT_OPEN}{PROTECT_CLOSE}]")
_MARKERS = ("\n", "\u2581\n", "<unk>")  # joined to no following text in SentencePiece vocabularies seen so far


class PromptBuilder:
    """Renders and tokenizes conversations for one pipeline."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.llm: LLMBackend = pipeline.llm

    def build(self, messages: list[dict[str, Any]], tools: ToolUse | None = None) -> Prompt:
        """Render and tokenize `messages` (with the functions of `tools`); images and audio stay placeholders,
        collected in their order."""
        parts = [part for m in messages if isinstance(m["content"], list) for part in m["content"]]
        images = [part["pixels"] for part in parts if part.get("type") == "image"]
        clips = [(part["samples"], part["rate"]) for part in parts if part.get("type") == "audio"]
        tokens = self.tokens(messages, tools)
        prompt = Prompt(tokens, [], [])
        if images:
            encoder, planner = self.pipeline.encoders.get("image"), self.pipeline.planner
            if encoder is None or planner.marker is None:
                raise InputError("this bundle has no image encoder; send text only, or build a bundle from a "
                                 "multimodal recipe")
            positions = [i for i, t in enumerate(tokens) if t == planner.marker]
            blocks = planner.blocks(images)
            if len(positions) != (sum(blocks) if blocks else len(images)):
                raise InputError(f"the chat template placed {len(positions)} image markers for {len(images)} images")
            prompt.images, prompt.image_positions, prompt.tokens_per_image = images, positions, encoder.n_tokens
            prompt.blocks_per_image = blocks
        if clips:
            if not self.pipeline.audio_embeds:
                raise InputError("this bundle's LLM takes no audio rows; audio parts are transcribed by `ask`")
            positions = [i for i, t in enumerate(tokens) if t == self.pipeline.audio_token_id]
            if len(positions) != len(clips):
                raise InputError(f"the chat template placed {len(positions)} audio markers for {len(clips)} clips")
            prompt.audio, prompt.audio_positions = clips, positions
            prompt.tokens_per_audio = self.pipeline.encoders["audio"].n_tokens
        return prompt

    def tokens(self, messages: list[dict[str, Any]], tools: ToolUse | None = None) -> list[int]:
        """The conversation rendered by the chat template and tokenized, each block of image rows a marker."""
        offered = None
        if tools is not None:  # calls and results as the template or the fallback writes them
            messages, offered = tools.messages_for_template(messages)
        prompt = render_chat(
            self.pipeline.chat_template,
            [self.for_template(m) for m in messages],
            bos_token=_special_text(self.llm, "bos"),
            eos_token=_special_text(self.llm, "eos"),
            tools=offered,
        )
        images = [p["pixels"] for m in messages if isinstance(m["content"], list) for p in m["content"]
                  if p.get("type") == "image"]
        tokens = self.pipeline.planner.tokens(prompt, images, self._tokenize)
        bos = self.llm.special_token("bos")
        if len(tokens) > 1 and bos is not None and tokens[0] == tokens[1] == bos[0]:
            tokens = tokens[1:]  # the template wrote BOS and the tokenizer added another
        return tokens

    def _protect(self, text: str) -> str:
        """A message's text as the template gets it: text that holds a control token's string
        (`<|im_end|>` typed by a user) is wrapped in private-use marks, and `_tokenize` reads
        it as plain text; the template's own markers, outside the marks, stay control tokens.
        Other text is left alone, so it is tokenized exactly as before (one call, no seams)."""
        if not any(s in text for s in self.llm.special_texts()):
            return text
        return PROTECT_OPEN + text.replace(PROTECT_OPEN, "").replace(PROTECT_CLOSE, "") + PROTECT_CLOSE

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        """The template's control tokens parsed, every other run of text tokenized as plain text in one piece:
        client text inside the protection marks joins the text around it, as if its control-token strings
        were ordinary characters. llama.cpp starts the text after a control token with SentencePiece's
        word-start mark, as HF's legacy tokenizers do; a bundle whose model's tokenizer does not (manifest
        llm.space_after_special false: VILA's legacy=False tokenizer) gets that text without it
        (`</s>USER:` -> `</s>`, `USER`, `:`), as its own tokenizer gives it."""
        spans = _PROTECTED.split(text)  # outside, inside, outside, ...
        mark_after_control = self.pipeline.bundle.llm.space_after_special
        if len(spans) == 1 and mark_after_control:
            return self.llm.tokenize(text, add_special=add_special, parse_special=True)
        controls = sorted({s for s in self.llm.special_texts() if any(s in span for span in spans[::2])},
                          key=len, reverse=True)
        split = re.compile("(" + "|".join(map(re.escape, controls)) + ")") if controls else None
        runs: list[tuple[bool, str]] = []  # (a control token, its text)
        plain = ""
        for i, span in enumerate(spans):
            pieces = [span] if i % 2 or split is None else split.split(span)
            for j, piece in enumerate(pieces):
                if j % 2:
                    runs += [(False, plain), (True, piece)]
                    plain = ""
                else:
                    plain += piece
        runs.append((False, plain))
        tokens = self.llm.tokenize("", add_special=True, parse_special=False) if add_special else []
        after_control = False
        for control, piece in runs:
            if control:
                tokens += self.llm.tokenize(piece, add_special=False, parse_special=True)
            elif piece:
                tokens += (self._after_control(piece) if after_control and not mark_after_control
                           else self.llm.tokenize(piece, add_special=False, parse_special=False))
            after_control = control
        return tokens

    def _after_control(self, text: str) -> list[int]:
        """`text` without the word-start mark llama.cpp puts first: tokenized behind a marker that no
        vocabulary piece joins to what follows, the marker's tokens then dropped (checked: the rest must
        spell `text` exactly, else the marker is not used)."""
        for marker in _MARKERS:
            head = self.llm.tokenize(marker, add_special=False, parse_special=False)
            both = self.llm.tokenize(marker + text, add_special=False, parse_special=False)
            rest = both[len(head):]
            if both[:len(head)] == head and b"".join(self.llm.token_bytes(t) for t in rest) == text.encode():
                return rest
        return self.llm.tokenize(text, add_special=False, parse_special=False)

    def for_template(self, message: dict[str, Any]) -> dict[str, Any]:
        """What the template sees: no pixels, and parts or a string as the template expects."""
        content = message["content"]
        if isinstance(content, str):
            content = self._protect(content)
            message = {**message, "content": content}
        if isinstance(content, list):
            parts = [{"type": p["type"]} if p.get("type") in ("image", "audio")
                     else {**p, "text": self._protect(p.get("text", ""))} for p in content]
            if self.pipeline.structured_content:
                return {**message, "content": parts}
            return {**message, "content": "".join(p.get("text", "") for p in parts)}
        if self.pipeline.structured_content:
            return {**message, "content": [{"type": "text", "text": content}]}
        return message


def _special_text(llm: LLMBackend, kind: str) -> str:
    special = llm.special_token(kind)
    return special[1] if special else ""
