"""A Jinja sandbox bounded in time and memory, for chat templates from model files.

Jinja's immutable sandbox keeps a template away from Python internals, but not from the
machine: a nested loop ran 2.8 s on the event loop, `{{ 'a' * 300000000 }}` took 10.7 GB.
Here every operation that can make a value bigger than its inputs is charged to a
per-render budget *before* it runs (intercepted `*`, `**`, `+`, `%`; `~` and block captures
through `concat`; calls of methods, globals and filters, with estimates for the ones that
amplify: `replace`, `join`, `expandtabs`, `format`, `indent`, `wordwrap`, `tojson`), integer
arguments of calls are capped like `range`, and a render that passes its deadline is
interrupted in its thread (`_Watchdog`).

Limits: an operation not listed above still runs, its result charged afterwards (so a
budget is overrun by at most one such step, and those steps are bounded by their inputs);
a single C-level call cannot be interrupted by the deadline, only refused by its estimate.
"""

from __future__ import annotations

import ctypes
import re
import string
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

from aicloud.engines.base import EngineError

MAX_INT_ARG = MAX_RANGE  # what `range` allows; no legitimate template pads wider
MAX_INT_BITS = 4096  # integers a template may compute (1233 decimal digits)
MAX_JSON_INDENT = 16
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


class TemplateLimitError(EngineError):
    """The model's chat template went past its time or size limit on these messages."""

    code = "chat_template_limit"


@dataclass(slots=True, frozen=True)
class RenderLimits:
    """`chars`: what a render may create beyond its inputs (strings count characters,
    containers their items), plus `per_input_char` for each character of message text;
    `seconds`: wall time on the render thread. A normal chat uses a few times its text."""

    seconds: float = 1.0
    chars: int = 4 << 20
    per_input_char: int = 8


class _Budget:
    __slots__ = ("deadline", "left", "limits")

    def __init__(self, limits: RenderLimits, input_chars: int) -> None:
        self.limits = limits
        self.left = limits.chars + limits.per_input_char * input_chars
        self.deadline = time.monotonic() + limits.seconds

    def charge(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise TemplateLimitError("the model's chat template produced too much output for "
                                     "these messages", param="messages")
        self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(
                f"the model's chat template took longer than {self.limits.seconds:g} s to "
                "render these messages", param="messages")


ITEM_CHARS = 16  # a container item costs a pointer and often an object of its own


def size(value: Any) -> int:
    """What a value costs the budget: characters of a string, items of a container."""
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, list | tuple | dict | set | frozenset):
        return len(value) * ITEM_CHARS
    return 0


def _check_ints(values: Iterable[Any]) -> None:
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT_ARG:
            raise TemplateLimitError(f"the model's chat template passed {MAX_INT_ARG}+ "
                                     "as an argument", param="messages")


def _printf_estimate(fmt: str, args: Any) -> int:
    """An upper bound of `fmt % args`; widths taken from `*` are in the args (capped)."""
    widths = 0
    for match in _PRINTF_SPEC.finditer(fmt):
        for part in match.groups():
            if part and part != "*":
                widths += int(part)
            elif part == "*":
                widths += MAX_INT_ARG
    values = args.values() if isinstance(args, dict) else (
        args if isinstance(args, tuple) else (args,))
    return len(fmt) + widths + sum(len(str(v)) if isinstance(v, int | float) else size(v)
                                   for v in values)


def _format_estimate(fmt: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    widths = 0
    for _, _, spec, _ in string.Formatter().parse(fmt):
        widths += sum(int(d) for d in re.findall(r"\d+", spec or ""))
    return len(fmt) + widths + sum(size(v) + 32 for v in (*args, *kwargs.values()))


def _join_estimate(sep: Any, items: list[Any]) -> int:
    return size(sep) * max(0, len(items) - 1) + sum(size(i) or 32 for i in items)


class _BoundedCodeGenerator(CodeGenerator):
    """`~` goes through the environment's bounded join instead of `str_join`."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_str_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Expired(TemplateLimitError):
    """Raised inside a render thread past its deadline (by `_Watchdog`, with no args)."""

    def __init__(self) -> None:
        super().__init__("the model's chat template took too long to render these "
                         "messages", param="messages")


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise `exc` in that thread at its next bytecode; None withdraws a pending one."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc else None)


class _Watchdog:
    """Stops renders that pass their deadline by raising `_Expired` in their thread. Free
    while a render is on time, unlike a trace function checking the clock (which made a
    4096-message render 3.7x slower, measured). A thread inside one long C call (a huge
    `str.replace`, say) is stopped only after it: the budget refuses those beforehand.
    Its own thread runs only while some render is being watched."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: dict[int, float] = {}
        self._fired: set[int] = set()
        self._running = False

    def start(self, seconds: float) -> None:
        me = threading.get_ident()
        with self._cond:
            self._deadlines[me] = time.monotonic() + seconds
            self._fired.discard(me)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="template-watchdog",
                                 daemon=True).start()
            self._cond.notify()

    def stop(self) -> None:
        """Stop watching this thread; an interruption not delivered yet is withdrawn."""
        me = threading.get_ident()
        while True:
            try:
                with self._cond:
                    self._deadlines.pop(me, None)
                    if me in self._fired:
                        self._fired.discard(me)
                        _raise_in(me, None)
                return
            except _Expired:  # it landed on the way out: the render is over anyway
                continue

    def _run(self) -> None:
        with self._cond:
            while self._deadlines:
                now = time.monotonic()
                for thread_id, deadline in self._deadlines.items():
                    if deadline <= now and thread_id not in self._fired:
                        self._fired.add(thread_id)
                        _raise_in(thread_id, _Expired)
                waiting = [d for t, d in self._deadlines.items() if t not in self._fired]
                self._cond.wait(max(0.0, min(waiting) - now) if waiting else 0.05)
            self._running = False


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, charging a per-thread `_Budget` (set by `bounded`)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._local = threading.local()
        self._watchdog = _Watchdog()
        self.globals.pop("lipsum", None)  # n paragraphs of filler: no template needs it
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}

    # -- the budget of the render on this thread -----------------------------------------

    @property
    def budget(self) -> _Budget:
        budget: _Budget | None = getattr(self._local, "budget", None)
        if budget is None:  # rendering outside `bounded` is a bug, not a template's doing
            raise RuntimeError("templates of a BoundedSandbox render only inside bounded()")
        return budget

    def bounded(self, chunks: Iterator[str], limits: RenderLimits, input_chars: int) -> str:
        """Consume a template's `generate()` on this thread within `limits`."""
        budget = _Budget(limits, input_chars)
        self._local.budget = budget
        self._watchdog.start(limits.seconds)
        try:
            out: list[str] = []
            for chunk in chunks:
                budget.charge(len(chunk))
                out.append(chunk)
            return "".join(out)
        finally:
            self._watchdog.stop()
            self._local.budget = None

    # -- hooks the compiled template calls -----------------------------------------------

    def concat(self, parts: Iterable[str]) -> str:
        """Block captures (`{% set %}…{% endset %}`, macros, `{% filter %}`)."""
        items = list(parts)
        self.budget.charge(sum(map(len, items)))
        return "".join(items)

    def bounded_str_join(self, parts: Iterable[Any]) -> str:
        items = [str(p) for p in parts]
        self.budget.charge(sum(map(len, items)))
        return "".join(items)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = self.budget
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*" and ints:
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateLimitError("the model's chat template computed a huge number",
                                         param="messages")
        elif operator == "*":
            count = right if isinstance(right, int) else left if isinstance(left, int) else 1
            budget.charge(max(size(left), size(right)) * max(count, 0))
        elif operator == "**" and ints and abs(left) > 1:
            if right > 0 and left.bit_length() * right > MAX_INT_BITS:
                raise TemplateLimitError("the model's chat template computed a huge number",
                                         param="messages")
        elif operator == "+":
            budget.charge(size(left) + size(right))
        elif operator == "%" and isinstance(left, str):
            budget.charge(_printf_estimate(left, right))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any,
             **kwargs: Any) -> Any:
        _check_ints((*args, *kwargs.values()))
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):
            args = __self._charge_str_method(getattr(method, "__name__", ""), owner, args,
                                             kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        __self.budget.charge(size(result))
        return result

    def _charge_str_method(self, name: str, text: str, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Charge what a string method may create before it runs; returns the args
        (a `join` of a generator gets the list it was counted from)."""
        if name == "replace" and len(args) >= 2:
            old, new = str(args[0]), str(args[1])
            hits = text.count(old) if old else len(text) + 1
            self.budget.charge(len(text) + hits * len(new))
        elif name == "join" and args:
            items = list(args[0])
            self.budget.charge(_join_estimate(text, items))
            args = (items, *args[1:])
        elif name == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            self.budget.charge(len(text) * max(1, int(tab)))
        elif name in ("format", "format_map"):
            self.budget.charge(_format_estimate(text, args, kwargs))
        return args

    def add_filter(self, name: str, func: Callable[..., Any]) -> None:
        self.filters[name] = self._bounded_filter(name, func)

    def _bounded_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        estimate = _FILTER_ESTIMATES.get(name)
        passes_first = getattr(func, "jinja_pass_arg", None) is not None  # context or env

        def bounded(*args: Any, **kwargs: Any) -> Any:
            values = args[1:] if passes_first else args
            _check_ints((*values, *kwargs.values()))
            if estimate is not None and values:
                self.budget.charge(estimate(values[0], list(values[1:]), kwargs))
            if name == "tojson" and int(kwargs.get("indent") or 0) > MAX_JSON_INDENT:
                raise TemplateLimitError("the model's chat template indents JSON too deeply",
                                         param="messages")
            result = func(*args, **kwargs)
            self.budget.charge(size(result))
            return result

        if passes_first:  # Jinja reads it to pass the context, eval context or environment
            bounded.jinja_pass_arg = func.jinja_pass_arg  # type: ignore[attr-defined]
        return bounded


def _replace_filter(value: Any, args: list[Any], kwargs: dict[str, Any]) -> int:
    text, old = str(value), str(args[0] if args else kwargs.get("old", ""))
    new = str(args[1] if len(args) > 1 else kwargs.get("new", ""))
    hits = text.count(old) if old else len(text) + 1
    return len(text) + hits * len(new)


def _join_filter(value: Any, args: list[Any], kwargs: dict[str, Any]) -> int:
    items = value if isinstance(value, list | tuple | str) else []
    return _join_estimate(args[0] if args else kwargs.get("d", ""), list(items))


def _indent_filter(value: Any, args: list[Any], kwargs: dict[str, Any]) -> int:
    width = args[0] if args else kwargs.get("width", 4)
    text = str(value)
    pad = len(width) if isinstance(width, str) else int(width)
    return len(text) + (text.count("\n") + 1) * max(0, pad)


def _wordwrap_filter(value: Any, args: list[Any], kwargs: dict[str, Any]) -> int:
    text = str(value)
    wrap = args[3] if len(args) > 3 else kwargs.get("wrapstring") or "\n"
    return len(text) * (1 + len(str(wrap)))


def _format_filter(value: Any, args: list[Any], kwargs: dict[str, Any]) -> int:
    return _printf_estimate(str(value), tuple(args) or kwargs)


_FILTER_ESTIMATES: dict[str, Callable[[Any, list[Any], dict[str, Any]], int]] = {
    "replace": _replace_filter, "join": _join_filter, "indent": _indent_filter,
    "wordwrap": _wordwrap_filter, "format": _format_filter,
}
