"""`ingot generate` and `ingot chat` on the embedded model (CPU)."""

from __future__ import annotations

import builtins

from ingot.cli import main

FLAGS = ["--device", "cpu", "--max-model-len", "256", "--max-num-seqs", "2"]


def test_generate_streams_one_prompt_and_batches_several(embedded_model_dir, capsys):
    assert main(["generate", str(embedded_model_dir), "--prompt", "The capital of France is", "--max-tokens", "6",
                 *FLAGS]) == 0
    one = capsys.readouterr().out
    assert "Paris" in one
    assert main(["generate", str(embedded_model_dir), "--prompt", "The capital of France is", "--prompt", "1, 2, 3,",
                 "--max-tokens", "6", *FLAGS]) == 0
    many = capsys.readouterr().out
    assert many.count("--- [") == 2 and "length, 6 tokens" in many
    assert one.strip() in many  # greedy: the same continuation alone and in a batch


def test_generate_rejects_bad_sampling_flags(embedded_model_dir, capsys):
    assert main(["generate", str(embedded_model_dir), "--prompt", "x", "--top-p", "0", *FLAGS]) == 1
    assert "top_p" in capsys.readouterr().err


def test_chat_multi_turn_reset_and_exit(embedded_model_dir, capsys, monkeypatch):
    from ingot.engine import LLM
    from ingot.engine.chat import chat_loop

    turns = iter(["What is the capital of France?", "And of Italy?", "/reset", "/nope", "/exit", "never read"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(turns))
    assert main(["chat", str(embedded_model_dir), "--max-tokens", "24", *FLAGS]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "Rome" in out and "[conversation cleared]" in out and "unknown command /nope" in out
    assert next(turns) == "never read"

    llm = LLM(embedded_model_dir, device="cpu", max_model_len=256, max_num_seqs=2)
    from ingot.engine import SamplingParams

    lines = iter(["What is the capital of France?", "And of Italy?"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    written = []
    messages = chat_loop(llm, SamplingParams(max_tokens=24), read, written.append, system="Be brief.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert "Rome" in messages[-1]["content"]  # the second turn saw the first (multi-turn through the template)
    assert "".join(written).count(messages[2]["content"]) == 1

