"""Chat templates: FastChat's by name (through fschat) and Jinja chat templates (the tokenizer's own).

``get_template(name, tokenizer)`` returns a :class:`Template`:

* a FastChat template name (``fastchat.conversation.get_conv_template``: ``vicuna_v1.1``, ``llama-2``,
  ``qwen-7b-chat``, ...). The tokenizer's bos is put in front of the rendered text when the tokenizer adds
  one (``add_bos_token``), as ``tokenizer(prompt)`` does in FastChat's training code;
* ``"auto"``: the tokenizer's ``chat_template`` (e.g. Qwen2.5's), rendered exactly as transformers'
  ``apply_chat_template`` does (ImmutableSandboxedEnvironment with trim_blocks/lstrip_blocks, loopcontrols,
  ``raise_exception``, ``strftime_now``, transformers' ``tojson``, ``{% generation %}``; the tokenizer's special
  token strings as variables). No bos is added: the template writes it when the model wants one;
* ``"chatml"`` / ``"llama-3"``: the common ChatML and Llama-3-Instruct Jinja templates (fschat 0.2.36 has
  neither name);
* a path to a ``.jinja`` file.

``Template.render_spans(conv)`` renders the whole conversation and finds, for every assistant turn, the
character span the model must learn to generate: from the end of the generation prompt
(``render(turns[:k], add_generation_prompt=True)``) to the end of the first special token (eos, ``<|im_end|>``,
``<|eot_id|>``, ...) after the assistant content; without a special token there, to the end of the turn
(``render(turns[:k+1])``). Templates whose renderings are not prefixes of one another (e.g. they rewrite history)
try the prompt's longest agreement with the whole text (Qwen3: the reasoning of the last turn, rendered as a
``<think>`` block, is supervised with it; earlier turns lose theirs as the template drops it), then fall back to
searching the contents in the text. Templates with ``{% generation %}`` blocks use those blocks.
``enable_thinking`` (a data option) is passed to templates that read it; ``reasoning_content`` of assistant turns
reaches templates that render it, and a record with reasoning is refused by a template that would drop it.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import List, Optional, Tuple

from ..errors import ConfigError
from .formats import Conversation, RecordError

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
BUILTIN_JINJA = {"chatml": CHATML_TEMPLATE, "llama-3": LLAMA3_TEMPLATE}


@dataclass
class Rendered:
    text: str
    spans: List[Tuple[int, int]]     # [start, end) character span of each assistant turn, in order
    prepend_bos: bool = False        # put the tokenizer's bos id in front of the tokens


def _special_regex(tokenizer):
    toks = sorted(getattr(tokenizer, "special_tokens", {}) or {}, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in toks)) if toks else None


class Template:
    """Renders Conversations to text and locates the assistant spans."""
    name: str = ""
    kind: str = ""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._special = _special_regex(tokenizer)

    # subclasses: render(conv, n_turns, add_generation_prompt) -> str
    def render(self, conv: Conversation, n_turns: Optional[int] = None, add_generation_prompt: bool = False) -> str:
        raise NotImplementedError

    def prepend_bos(self, text: str) -> bool:
        return False

    def generation_spans(self, conv: Conversation):
        """(text, spans) from {% generation %} blocks, or None when the template has none."""
        return None

    def check(self, conv: Conversation):
        """RecordError when the template would drop part of the record (reasoning it does not render)."""
        if conv.reasoning and not self.renders_reasoning:
            raise RecordError(f"template {self.name!r} does not render reasoning_content (assistant turn "
                              f"{min(conv.reasoning)}); use a template that does (e.g. Qwen3's own, 'auto') or put "
                              "the reasoning in the content")

    renders_reasoning = False

    def render_spans(self, conv: Conversation) -> Rendered:
        self.check(conv)
        gen = self.generation_spans(conv)
        if gen is not None:
            text, spans = gen
            return Rendered(text, spans, self.prepend_bos(text))
        text = self.render(conv)
        spans = self._prefix_spans(conv, text)
        if spans is None:
            spans = self._history_spans(conv, text)
        if spans is None:
            spans = self._search_spans(conv, text)
        return Rendered(text, spans, self.prepend_bos(text))

    def _end_of_span(self, text: str, content: str, start: int, stop: int) -> int:
        """End of the span that starts at `start`: after the first special token following the content."""
        c = text.find(content, start, stop) if content else -1
        if c < 0 and content.strip():
            c = text.find(content.strip(), start, stop)
            cend = c + len(content.strip())
        else:
            cend = c + len(content)
        if c < 0:
            cend = start
        if self._special is not None:
            m = self._special.search(text, cend, stop)
            if m is not None:
                return m.end()
        return stop

    def _prefix_spans(self, conv: Conversation, text: str):
        spans = []
        for i, (role, content) in enumerate(conv.turns):
            if role != "assistant":
                continue
            prompt = self.render(conv, i, add_generation_prompt=True)
            upto = text if i == len(conv.turns) - 1 else self.render(conv, i + 1)
            if not (text.startswith(prompt) and text.startswith(upto) and len(prompt) <= len(upto)):
                return None
            spans.append((len(prompt), self._end_of_span(text, content, len(prompt), len(upto))))
        return spans

    def _history_spans(self, conv: Conversation, text: str):
        """For templates that render the last turn unlike earlier ones (Qwen3 keeps the <think> block only after
        the last user query, and its generation prompt may hold an empty one): a turn starts where the prompt
        for it (history + generation prompt) stops agreeing with the whole text, provided the history itself
        (``render(turns[:k])``) is a prefix of the text; it ends after the first special token after it."""
        spans, floor = [], 0
        for i, (role, content) in enumerate(conv.turns):
            if role != "assistant":
                continue
            hist = self.render(conv, i)
            if not text.startswith(hist) or len(hist) < floor:
                return None
            prompt = self.render(conv, i, add_generation_prompt=True)
            start = len(os.path.commonprefix([prompt, text]))
            end = self._end_of_span(text, content, start, len(text))
            if end <= start:
                return None
            spans.append((start, end))
            floor = end
        return spans

    def _search_spans(self, conv: Conversation, text: str):
        spans, cursor = [], 0
        for j, (role, content) in enumerate(conv.turns):
            needle = content if text.find(content, cursor) >= 0 else content.strip()
            c = text.find(needle, cursor)
            if c < 0:
                raise RecordError(f"template {self.name!r}: cannot find the text of turn {j} ({role}) in the "
                                  "rendered conversation")
            cend = c + len(needle)
            if role == "assistant":
                nxt = len(text)
                if j + 1 < len(conv.turns):
                    n2 = text.find(conv.turns[j + 1][1].strip() or conv.turns[j + 1][1], cend)
                    nxt = n2 if n2 >= 0 else len(text)
                m = self._special.search(text, cend, nxt) if self._special is not None else None
                spans.append((c, m.end() if m is not None else cend))
            cursor = cend
        return spans


# -- FastChat -----------------------------------------------------------------------------------------------------

def _fastchat_names() -> List[str]:
    from fastchat.conversation import conv_templates
    return sorted(conv_templates)


class FastChatTemplate(Template):
    kind = "fastchat"

    def __init__(self, name: str, tokenizer):
        super().__init__(tokenizer)
        from fastchat.conversation import get_conv_template
        self.name = name
        self.conv = get_conv_template(name)
        self.roles = self.conv.roles

    def render(self, conv: Conversation, n_turns: Optional[int] = None, add_generation_prompt: bool = False) -> str:
        c = self.conv.copy()
        if conv.system is not None:
            c.set_system_message(conv.system)
        turns = conv.turns if n_turns is None else conv.turns[:n_turns]
        c.messages = [[self.roles[0] if r == "user" else self.roles[1], t] for r, t in turns]
        if add_generation_prompt:
            c.messages.append([self.roles[1], None])
        return c.get_prompt()

    def prepend_bos(self, text: str) -> bool:
        tok = self.tokenizer
        return bool(getattr(tok, "add_bos_token", False)) and tok.bos_token_id is not None and not (
            tok.bos_token and text.startswith(tok.bos_token))


# -- Jinja (transformers' apply_chat_template) ------------------------------------------------------------------------

@lru_cache(maxsize=16)
def compile_jinja(source: str):
    """The template compiled as transformers' _compile_jinja_template does."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(Extension):
        """`{% generation %}...{% endgeneration %}`: records the character span of each block when active."""
        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(generation_tracker=self)
            self.blocks = None
            self.spans = None

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body).set_lineno(lineno)

        def _generation(self, caller):
            rv = caller()
            if self.blocks is not None:
                start = len("".join(self.blocks))
                self.spans.append((start, start + len(rv)))
            return rv

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTracker, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(f"chat template: Jinja syntax error at line {e.lineno}: {e.message}") from None


class JinjaTemplate(Template):
    kind = "jinja"

    def __init__(self, source: str, tokenizer, name: str = "jinja", enable_thinking: Optional[bool] = None):
        super().__init__(tokenizer)
        self.name = name
        self.source = source
        self.compiled = compile_jinja(source)
        self.has_generation = re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None
        self.renders_reasoning = "reasoning_content" in source
        # template variables beyond messages: only those set are passed (an unset one is `undefined`, so the
        # template's own default applies, as with apply_chat_template without the keyword)
        self.extra = {}
        if enable_thinking is not None:
            if "enable_thinking" not in source:
                raise ConfigError(f"enable_thinking is set but chat template {name!r} does not read it (Qwen3's "
                                  "template does); leave it unset for this template")
            self.extra["enable_thinking"] = bool(enable_thinking)
        # transformers passes tokenizer.special_tokens_map (the named special tokens that are set)
        kw = {}
        for attr in ("bos_token", "eos_token", "unk_token"):
            v = getattr(tokenizer, attr, None)
            if v is not None:
                kw[attr] = v
        if getattr(tokenizer, "pad_token", None) is not None and getattr(tokenizer, "pad_token_fallback", None) is None:
            kw["pad_token"] = tokenizer.pad_token
        named = set(kw.values())
        extra = [t for t in (getattr(tokenizer, "special_tokens", {}) or {}) if t not in named]
        if extra:
            kw["additional_special_tokens"] = extra
        self.kwargs = kw

    def _render_messages(self, messages, add_generation_prompt):
        import jinja2
        try:
            return self.compiled.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.kwargs, **self.extra)
        except jinja2.exceptions.TemplateError as e:
            raise RecordError(f"chat template {self.name!r}: {e}") from None

    def render(self, conv: Conversation, n_turns: Optional[int] = None, add_generation_prompt: bool = False) -> str:
        msgs = conv.messages()
        if n_turns is not None:
            msgs = msgs[:n_turns + (1 if conv.system is not None else 0)]
        return self._render_messages(msgs, add_generation_prompt)

    def generation_spans(self, conv: Conversation):
        if not self.has_generation:
            return None
        tracker = self.compiled.environment.generation_tracker
        import jinja2
        blocks, spans = [], []
        tracker.blocks, tracker.spans = blocks, spans
        try:
            ctx = self.compiled.new_context(dict(messages=conv.messages(), tools=None, documents=None,
                                                 add_generation_prompt=False, **self.kwargs, **self.extra))
            for block in self.compiled.root_render_func(ctx):
                blocks.append(block)
        except jinja2.exceptions.TemplateError as e:
            raise RecordError(f"chat template {self.name!r}: {e}") from None
        finally:
            tracker.blocks, tracker.spans = None, None
        return "".join(blocks), spans


# -- lookup ---------------------------------------------------------------------------------------------------------

def template_names() -> List[str]:
    return sorted(set(_fastchat_names()) | set(BUILTIN_JINJA) | {"auto"})


def get_template(name: str, tokenizer, enable_thinking: Optional[bool] = None) -> Template:
    """The template called `name` (see the module docstring); ConfigError with close names when unknown.

    ``enable_thinking`` (None: unset, the template's default) is passed to Jinja templates that read it (Qwen3)."""
    name = (name or "auto").strip()
    if name == "auto":
        src = getattr(tokenizer, "chat_template", None)
        if not src:
            raise ConfigError(f"template 'auto': the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
                              "chat_template; name a FastChat template instead (e.g. vicuna_v1.1, llama-2)")
        return JinjaTemplate(src, tokenizer, name="auto", enable_thinking=enable_thinking)
    if name.endswith(".jinja") and os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            return JinjaTemplate(f.read(), tokenizer, name=name, enable_thinking=enable_thinking)
    fc = _fastchat_names()
    if name in fc:
        if enable_thinking is not None:
            raise ConfigError(f"enable_thinking is set but FastChat template {name!r} has no thinking switch; "
                              "leave it unset (it is for Jinja templates such as Qwen3's)")
        return FastChatTemplate(name, tokenizer)
    if name in BUILTIN_JINJA:
        return JinjaTemplate(BUILTIN_JINJA[name], tokenizer, name=name, enable_thinking=enable_thinking)
    names = template_names()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if not close:
        low = name.lower()
        close = [n for n in names if low[:4] in n.lower()][:5]
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise ConfigError(f"unknown chat template {name!r}{hint} (FastChat templates, chatml, llama-3, 'auto' for the "
                      "tokenizer's own chat_template, or a .jinja file)")
