"""A multi-turn chat loop over an LLM (``ingot chat``): the conversation goes through the tokenizer's chat template
each turn, the reply streams as it is generated. Input and output are passed in, so tests drive it with lists."""

from __future__ import annotations

from collections.abc import Callable

from ingot.engine.llm import LLM
from ingot.engine.sampling import SamplingParams

HELP = "/reset clears the conversation, /exit (or end of input) quits"


def chat_loop(
    llm: LLM,
    params: SamplingParams,
    read: Callable[[str], str],
    write: Callable[[str], None],
    system: str | None = None,
) -> list[dict]:
    """Read a user turn with ``read(prompt)`` (EOFError ends the loop), stream the assistant's reply through
    ``write``, repeat. "/reset" starts a new conversation, "/exit" quits. Returns the last conversation."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    write(f"[{HELP}]\n")
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return messages
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return messages
        if text == "/reset":
            messages = list(start)
            write("[conversation cleared]\n")
            continue
        if text.startswith("/"):
            write(f"[unknown command {text.split()[0]}: {HELP}]\n")
            continue
        messages.append({"role": "user", "content": text})
        reply = []
        for delta in llm.stream([llm.chat_prompt(messages)], params):
            reply.append(delta.text)
            write(delta.text)
        write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
