"""Regular expressions that match in bounded time.

Module-name regexes (``LoraConfig.targets`` / ``exclude``, PEFT's ``target_modules``) often come
from files written by others. Python's backtracking matcher takes exponential time on patterns
such as ``(.+)+X`` and polynomial time of high degree on long chains of ``.*``, so a hostile or
careless file could hang ``load_adapter``. :func:`unsafe_regex_reason` accepts the patterns
people write for module names and refuses the shapes that backtrack without bound:

========================================  ================================================
refused                                   why
========================================  ================================================
a repeat inside a repeat ``(a+)*``        exponentially many ways to split the input
an alternation inside a repeat ``(a|b)*``  the same, when the branches overlap
a backreference ``(a)\\1``                  matching is NP-hard in general
more than :data:`MAX_UNBOUNDED_REPEATS`   each unbounded repeat multiplies the work by the
unbounded repeats                         name length
a pattern over :data:`MAX_PATTERN_LENGTH`
========================================  ================================================

A repeat whose upper bound is 1 (``?``) counts as neither, and character classes (``[a-z]+``,
``\\d+``) are single items, so ``model\\.layers\\.\\d+\\.(q|v)_proj`` and
``^(?!.*vision).*\\.(q_proj|v_proj)$`` are accepted.
"""

from __future__ import annotations

try:  # Python >= 3.11
    from re import _constants as _sre_constants
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_constants  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

#: Unbounded repeats (``*``, ``+``, ``{n,}``) a pattern may hold.
MAX_UNBOUNDED_REPEATS = 3
#: Characters a pattern may have.
MAX_PATTERN_LENGTH = 1000

_REPEATS = {
    _sre_constants.MAX_REPEAT,
    _sre_constants.MIN_REPEAT,
    getattr(_sre_constants, "POSSESSIVE_REPEAT", _sre_constants.MAX_REPEAT),
}
_UNBOUNDED = _sre_constants.MAXREPEAT


def unsafe_regex_reason(pattern: str) -> str | None:
    """Why matching ``pattern`` may take unbounded time, or None when it is safe to match.

    ``pattern`` must compile (check with ``re.compile`` first).
    """
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"longer than {MAX_PATTERN_LENGTH} characters"
    counts = {"unbounded": 0}
    reason = _walk(_sre_parse.parse(pattern), inside_repeat=False, counts=counts)
    if reason is None and counts["unbounded"] > MAX_UNBOUNDED_REPEATS:
        reason = (
            f"{counts['unbounded']} unbounded repeats such as '*' or '+'; at most "
            f"{MAX_UNBOUNDED_REPEATS} are allowed"
        )
    return reason


def _children(op, arg) -> list:
    """The sub-patterns of one parsed node."""
    if op in _REPEATS:
        return [arg[2]]
    if op == _sre_constants.SUBPATTERN:
        return [arg[3]]
    if op == _sre_constants.BRANCH:
        return list(arg[1])
    if op in (_sre_constants.ASSERT, _sre_constants.ASSERT_NOT):
        return [arg[1]]
    if op == getattr(_sre_constants, "ATOMIC_GROUP", None):
        return [arg]
    return []


def _walk(items, inside_repeat: bool, counts: dict[str, int]) -> str | None:
    for op, arg in items:
        if op in (_sre_constants.GROUPREF, _sre_constants.GROUPREF_EXISTS):
            return "a backreference"
        if op in _REPEATS:
            low, high, body = arg
            if high == _UNBOUNDED:
                counts["unbounded"] += 1
            if high > 1 and inside_repeat:
                return "a repeat nested inside another repeat, e.g. '(a+)*'"
            if high > 1:
                reason = _walk(body, inside_repeat=True, counts=counts)
            else:
                reason = _walk(body, inside_repeat=inside_repeat, counts=counts)
            if reason is not None:
                return reason
            continue
        if op == _sre_constants.BRANCH and inside_repeat:
            return "an alternation inside a repeat, e.g. '(a|b)*'"
        for child in _children(op, arg):
            reason = _walk(child, inside_repeat=inside_repeat, counts=counts)
            if reason is not None:
                return reason
    return None
