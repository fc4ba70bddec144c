"""torch's weights-only refusals in plain words: which global a pickle wanted and why it was
refused, never torch's advice to load the file again with `weights_only=False` (that would run
the file's code). Torch-free, so the loaders of trainers/ and preprocess/ share it."""
from __future__ import annotations

import pickle
import re

_GLOBAL_NAMES = (re.compile(r"GLOBAL (\S+) was not an allowed global"),
                 re.compile(r"unsupported GLOBAL (\S+) whose module"))
# sentences of torch's message that advise an unsafe load, or point at its documentation
_ADVICE = re.compile(r"weights_only|safe_globals|trust|documentation|file an issue|"
                     r"two options|pytorch\.org|Weights only load failed|^\(?\d\)", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SENTENCE_END = re.compile(r"(?<=\.)\s+(?=[A-Z(])")


def refused_globals(text: str) -> list[str]:
    """The globals a refusal message names, e.g. ['posix.system']."""
    found = []
    for pattern in _GLOBAL_NAMES:
        found += [name.rstrip(".,") for name in pattern.findall(text)]
    return sorted(set(found))


def refusal_reason(text: str) -> str:
    """torch's reason without its advice: 'Trying to load unsupported GLOBAL posix.system whose
    module posix is blocked.' ('' when only advice was left)."""
    text = _ANSI.sub("", text).replace("WeightsUnpickler error:", "\n")
    kept = []
    for line in text.splitlines():
        for sentence in _SENTENCE_END.split(line.strip()):
            sentence = sentence.strip()
            if sentence and not _ADVICE.search(sentence):
                kept.append(sentence)
    return " ".join(kept)


def weights_only_refusal(error: BaseException | None) -> BaseException | None:
    """The error in `error`'s chain that is a refusal by torch's weights-only unpickler, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in str(error) \
                or "weights_only" in str(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def refused_message(name: str, text: str) -> str:
    """'<name>: refused to load: ...', from a refusal's text."""
    found = refused_globals(text)
    if found:
        return (f"{name}: refused to load: it contains Python objects other than tensors and "
                f"plain containers (it wants {', '.join(found)}; nothing in it was run)")
    reason = refusal_reason(text) or "it holds something other than tensors and plain containers"
    return f"{name}: refused to load by the restricted loader: {reason}"


def without_unsafe_advice(text: str) -> str:
    """An error text fit to show: a weights-only refusal keeps only its reason."""
    if "weights_only" not in text and "Weights only load failed" not in text:
        return text
    return refusal_reason(text) or "refused by the restricted loader (not only tensors)"
