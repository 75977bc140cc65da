"""Run options as the CLI spells them (``--gpu-memory 4GiB --offload disk``) turned into ``LLM``
keyword arguments, checked against ``EngineConfig``'s fields so a typo is a one-line error."""

from __future__ import annotations

import dataclasses
import shlex

from ollm.errors import OllmError

# Options that change results (lossy). The exact path of a setting drops them; each lossy
# feature adds its field here when it lands (KV codecs, eviction, attention routing).
LOSSY_FIELDS: frozenset[str] = frozenset(
    {"attention", "attention_page_tokens", "attention_prefill"}  # attention routing (issue 18)
)

# KV compression (issue 17): the codec and its exact window change what attention reads.
LOSSY_FIELDS = LOSSY_FIELDS | {"kv_codec", "kv_recent", "kv_evict", "kv_keep"}


def _fields() -> dict[str, str]:
    from ollm.config import EngineConfig

    return {f.name: str(f.type) for f in dataclasses.fields(EngineConfig)}


def parse_options(args: str | list[str]) -> dict[str, object]:
    """``"--offload disk --max-context=8192 --no-verify-checksums"`` -> LLM kwargs."""
    tokens = shlex.split(args) if isinstance(args, str) else list(args)
    fields = _fields()
    out: dict[str, object] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise OllmError(f"expected an option like --offload, got {tok!r}")
        name, eq, value = tok[2:].partition("=")
        key = name.replace("-", "_")
        negated = key.startswith("no_") and key[3:] in fields
        key = key[3:] if negated else key
        if key not in fields:
            known = ", ".join("--" + f.replace("_", "-") for f in sorted(fields))
            raise OllmError(f"unknown run option --{name}; known: {known}")
        kind = fields[key]
        if "bool" in kind:
            if negated or eq:
                flag = not negated and value.lower() in ("1", "true", "yes", "on")
            else:
                flag = True
            out[key] = flag
            i += 1
            continue
        if not eq:
            if i + 1 >= len(tokens):
                raise OllmError(f"--{name} needs a value")
            value = tokens[i + 1]
            i += 1
        out[key] = _convert(name, value, kind)
        i += 1
    return out


def _convert(name: str, value: str, kind: str) -> object:
    if kind.startswith("int"):
        if name.endswith("memory"):  # budgets take sizes ("4GiB"), parsed with a clear error
            from ollm.sizes import parse_size

            return parse_size(value)
        try:
            return int(value)
        except ValueError:
            raise OllmError(f"--{name} needs a whole number, not {value!r}") from None
    if value.lower() == "none" and "None" in kind:
        return None
    return value  # strings and sizes ("4GiB"): EngineConfig validates them


def exact_options(options: dict[str, object]) -> dict[str, object]:
    """The same setting without its lossy options: the reference a quality cost is measured
    against (placement, offload and dtype stay: they are part of what the user runs)."""
    return {k: v for k, v in options.items() if k not in LOSSY_FIELDS}
