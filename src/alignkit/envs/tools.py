"""Tools: JSON schemas from docstrings (transformers' get_json_schema, as TRL does), calls run with a timeout whose
failures go back to the model as {"error": ...}, and the default tool format for chat templates without tool support.

The default format is Hermes-style (Qwen, Hermes, many others): the schemas in a <tools> block of the system turn,
and each call written as <tool_call>{"name": ..., "arguments": {...}}</tool_call>. Where the tokenizer carries a
response template (transformers' parse_response), replies are parsed with it instead."""

from __future__ import annotations

import inspect
import json
import re
import threading
from collections.abc import Callable

from transformers.utils import get_json_schema

from alignkit.data.template import render_chat
from alignkit.envs.base import EnvError, resolve

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
OPEN_CALL = "<tool_call>"
SYSTEM_BLOCK = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{schemas}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def tool_schema(fn: Callable, env: str) -> dict:
    """fn's JSON schema from its signature and Google-style docstring; an EnvError naming the tool when it has no
    docstring, an undocumented argument or an argument type JSON schema cannot express."""
    try:
        return get_json_schema(fn)
    except Exception as err:  # transformers raises DocstringParsingException / TypeHintParsingException
        name = getattr(fn, "__name__", repr(fn))
        raise EnvError(env, None, f"tool '{name}' cannot be described to the model: {err}",
                       "give it a Google-style docstring (a summary and an Args: line per argument) and type hints "
                       "of str, int, float, bool, list, dict or Literal") from None


def public_methods(instance, skip: tuple[str, ...] = ("reset", "get_reward")) -> dict[str, Callable]:
    """TRL's rule for an environment's tools: the public functions of its class other than reset and get_reward
    (listed on the class, so properties are not evaluated), bound to the instance."""
    return {name: getattr(instance, name) for name, _ in inspect.getmembers(type(instance), inspect.isfunction)
            if not name.startswith("_") and name not in skip}


def call_tool(fn: Callable, arguments: dict, timeout: float, max_chars: int) -> str:
    """fn(**arguments) as the text the model reads. An exception or a timeout becomes {"error": ...}; the result is
    cut to max_chars. A call that times out keeps running on its daemon thread (a Python thread cannot be killed):
    put untrusted work in a subprocess, as the shipped calculate tool does."""
    box: dict = {}

    def target():
        try:
            box["value"] = resolve(fn(**arguments))
        except Exception as err:  # noqa: BLE001 - the model is told what went wrong
            box["error"] = f"{type(err).__name__}: {err}"

    thread = threading.Thread(target=target, daemon=True, name=f"tool-{getattr(fn, '__name__', 'call')}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        text = json.dumps({"error": f"the tool call timed out after {timeout:g} s"})
    elif "error" in box:
        text = json.dumps({"error": box["error"]})
    else:
        value = box.get("value")
        text = value if isinstance(value, str) else json.dumps(value, default=str)
    return truncate(text, max_chars)


def truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    note = f"... [cut: {len(text)} characters]"
    return text[:max_chars - len(note)] + note


def error_message(text: str) -> dict:
    """What the model reads when its call could not be run (malformed, unknown tool, over the per-turn limit)."""
    return {"role": "tool", "name": "error", "content": json.dumps({"error": text})}


def run_tool_calls(message: dict, tools: dict[str, Callable], timeout: float, max_chars: int) -> list[dict]:
    """One tool message per call in message["tool_calls"] (in order), then one per entry of
    message["tool_call_errors"] (calls that could not be parsed)."""
    replies = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        name, arguments = function.get("name"), function.get("arguments") or {}
        if name not in tools:
            replies.append(error_message(f"unknown tool {name!r}; the tools are {sorted(tools)}"))
        elif not isinstance(arguments, dict):
            replies.append(error_message(f"the arguments of {name} must be a JSON object, got {arguments!r}"))
        else:
            replies.append({"role": "tool", "name": name,
                            "content": call_tool(tools[name], arguments, timeout, max_chars)})
    replies += [error_message(text) for text in message.get("tool_call_errors") or []]
    return replies


def template_supports_tools(tokenizer) -> bool:
    """Whether the chat template renders the `tools` it is given (SmolLM2's, like alignkit's default, ignores them)."""
    probe = {"type": "function", "function": {"name": "alignkit_probe_tool", "description": "probe",
                                              "parameters": {"type": "object", "properties": {}}}}
    try:
        text = render_chat(tokenizer, [{"role": "user", "content": "x"}], add_generation_prompt=True, tools=[probe])
    except Exception:  # noqa: BLE001 - a template that fails on tools does not support them
        return False
    return "alignkit_probe_tool" in text


def with_tool_block(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The prompt with the default format's tool block in its system turn (added to one it already has)."""
    if not tools:
        return list(messages)
    block = SYSTEM_BLOCK.format(schemas="\n".join(json.dumps(t) for t in tools))
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + block}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def parse_default(text: str) -> dict:
    """An assistant message from text in the default format: content (the text before the first call), tool_calls
    [{"type": "function", "function": {"name", "arguments"}}], tool_call_errors (one line per malformed call)."""
    calls, errors = [], []
    for body in TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except ValueError as err:
            errors.append(f"malformed tool call (not JSON: {err}); write <tool_call>{{\"name\": ..., "
                          f"\"arguments\": {{...}}}}</tool_call>")
            continue
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            errors.append('malformed tool call: expected {"name": "<tool>", "arguments": {...}}')
            continue
        calls.append({"type": "function", "function": {"name": call["name"], "arguments": arguments}})
    if text.count(OPEN_CALL) > len(calls) + len(errors):
        errors.append("malformed tool call: <tool_call> without a closing </tool_call>")
    content = text.split(OPEN_CALL, 1)[0].strip()
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    if errors:
        message["tool_call_errors"] = errors
    return message


def parse_reply(tokenizer, sampled_ids: list[int], context_ids: list[int], text: str, tools: list[dict]) -> dict:
    """The assistant message of one turn: through the tokenizer's response template where it has one (transformers'
    parse_response, given the context so it sees what the template pre-wrote), else the default format. A reply the
    parser cannot read keeps its text and carries the parser's complaint as a tool-call error."""
    if getattr(tokenizer, "response_template", None) is None:
        return parse_default(text)
    try:
        parsed = tokenizer.parse_response(sampled_ids, prefix=context_ids, tools=tools or None)
    except Exception as err:  # noqa: BLE001 - malformed output goes back to the model, never crashes the run
        return {"role": "assistant", "content": text, "tool_call_errors": [f"malformed tool call: {err}"]}
    message = {"role": "assistant", "content": parsed.get("content") or ""}
    if parsed.get("tool_calls"):
        message["tool_calls"] = parsed["tool_calls"]
    if OPEN_CALL in text and not parsed.get("tool_calls"):
        message["tool_call_errors"] = ["malformed tool call: it could not be parsed"]
    return message
