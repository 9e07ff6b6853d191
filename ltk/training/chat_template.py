"""A tokenizer's own chat template (Jinja, from a Hugging Face folder) for fine-tuning on chat rows,
with the loss on the assistant turns only.

    ltk finetune --base hf/llama --data chats.jsonl --chat-template base     # the base folder's template
    ltk finetune --base runs/x --data chats.jsonl --chat-template hf/llama  # another folder's
    ltk train --task.kind instruct ... --task.chat_template hf/llama         # the same, as the config's field

Where the template is read from (the places transformers writes it): chat_template.jinja, or
tokenizer_config.json's "chat_template" (a string, or a list of {"name", "template"}: "default"),
or chat_template.json. It is rendered as transformers' `apply_chat_template` renders it: a
sandboxed Jinja environment with trim_blocks and lstrip_blocks, the loop controls, `tojson`,
`raise_exception`, `strftime_now`, and the folder's special tokens (bos_token, eos_token, ...) as
variables; the text is then tokenized with the special tokens it contains parsed as such (the
template writes them on purpose; transformers does the same).

Which tokens are targets. Every assistant turn is learned — its content and what the template
closes it with (an end-of-turn token), so the model learns to stop — and nothing else: system and
user text, the headers the template writes (`<|start_header_id|>assistant<|end_header_id|>`) are
context. The spans of the assistant turns in the rendered text are found

  * from the template's `{% generation %}...{% endgeneration %}` markers where it has them (what
    transformers' return_assistant_tokens_mask reads), else
  * by rendering: for assistant message i, the text of messages[:i] with the generation prompt
    ends where the turn starts, and the text of messages[:i+1] ends where it ends. This needs the
    rendering of a conversation to extend the rendering of its prefixes, which is checked: a
    template that rewrites earlier turns (some drop past reasoning) is refused, naming the turn.

A token is a target when its characters overlap an assistant span; labels[t] = ids[t+1] where
token t+1 is one, else -100 (ltk/training/instruct.py). A conversation longer than max_len keeps
its last max_len tokens (the most recent turns), and must keep at least one target.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from ltk.training.instruct import IGNORE_INDEX

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def template_for(spec: str, base: str) -> "ChatTemplate":
    """task.chat_template: "base" (the base folder's own template: a Hugging Face base's folder, or
    the checkpoint folder holding our base's tokenizer), or a folder / .jinja file."""
    if spec == "base":
        from ltk.training.base_model import open_base

        return load_chat_template(open_base(base).tok_dir)
    return load_chat_template(spec)


def load_chat_template(path: str | Path) -> "ChatTemplate":
    """The chat template of a Hugging Face folder (or a .jinja file), with the folder's special tokens."""
    path = Path(path).expanduser()
    if path.is_file():
        return ChatTemplate(path.read_text(encoding="utf-8"), {}, str(path))
    if not path.is_dir():
        raise FileNotFoundError(f"chat template {path}: no such folder or file")
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    special = {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items()
               if k.endswith("_token") and isinstance(v, (str, dict))}
    special = {k: v for k, v in special.items() if isinstance(v, str)}
    if (path / "chat_template.jinja").is_file():
        return ChatTemplate((path / "chat_template.jinja").read_text(encoding="utf-8"), special,
                            str(path / "chat_template.jinja"))
    source = config.get("chat_template")
    if source is None and (path / "chat_template.json").is_file():
        source = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    if isinstance(source, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str):
        raise ValueError(f"chat template {path}: no chat_template in chat_template.jinja, tokenizer_config.json "
                         "or chat_template.json (a base model without one has no chat format to learn)")
    return ChatTemplate(source, special, str(config_file))


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str], where: str):
        self.source, self.special, self.where = source, special_tokens, where
        self.has_markers = bool(_GENERATION.search(source))
        self._env, self._tracker = _environment()
        try:
            self._template = self._env.from_string(source)
        except Exception as e:  # jinja2's TemplateSyntaxError: a file that is not a template
            raise ValueError(f"chat template {where}: not a Jinja template ({type(e).__name__}: {e})") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The text transformers' apply_chat_template(messages, tokenize=False) gives."""
        return self._render(messages, add_generation_prompt)[0]

    def _render(self, messages, add_generation_prompt) -> tuple[str, list[tuple[int, int]]]:
        blocks, spans = [], []
        self._tracker.track = (blocks, spans)
        try:
            for block in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **self.special):
                blocks.append(block)
        except Exception as e:  # a template error (raise_exception, a bad row): name the template
            raise ValueError(f"chat template {self.where}: {type(e).__name__}: {e}") from None
        finally:
            self._tracker.track = None
        return "".join(blocks), spans

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, the [start, end) character spans of its assistant turns)."""
        text, spans = self._render(messages, False)
        if self.has_markers:
            return text, spans
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ValueError(f"chat template {self.where}: the rendering of the whole conversation does not "
                                 f"extend that of its first {i + 1} messages, so assistant turn {i} cannot be "
                                 "located; use a template with {% generation %} markers")
            spans.append((len(before), len(upto)))
        return text, spans

    def encode(self, tok, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels), both of length L - 1 (L <= max_len): labels on the assistant tokens."""
        _check_messages(messages)
        text, spans = self.assistant_spans(messages)
        backend = tok.backend
        was = backend.encode_special_tokens
        backend.encode_special_tokens = False  # the template's special tokens are meant as such
        try:
            enc = backend.encode(text, add_special_tokens=False)
        finally:
            backend.encode_special_tokens = was
        ids = enc.ids
        target = [any(s < b and e > a for a, b in spans) for s, e in enc.offsets]
        if len(ids) > max_len:  # keep the most recent turns
            ids, target = ids[-max_len:], target[-max_len:]
        labels = [i if t else IGNORE_INDEX for i, t in zip(ids[1:], target[1:])]
        if all(v == IGNORE_INDEX for v in labels):
            raise ValueError(f"no assistant token left to learn within max_len={max_len} "
                             f"({len(enc.ids)} tokens rendered)")
        return ids[:-1], labels


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be an object with 'role' and 'content', got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("messages have no assistant turn: nothing to learn")


def _environment():
    """transformers' chat-template environment (utils/chat_template_utils.py), and the tracker
    of its `{% generation %}` blocks."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}
        track = None  # (blocks rendered so far, spans) while a render runs

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            if self.track is not None:
                blocks, spans = self.track
                start = len("".join(blocks))
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    tracker = next(e for e in env.extensions.values() if isinstance(e, Generation))
    return env, tracker
