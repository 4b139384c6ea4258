"""bench e2e on CPU with a tiny Llama config: every scheme vs BF16 in one run, the transformers peer, the JSON."""

from __future__ import annotations

import json

import pytest
import torch

from ingot.bench.e2e import BenchE2EOptions, decode_bytes_per_token, model_config, ratios_and_targets, run_bench_e2e

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core machine (see tests/engine/conftest.py)
    yield
    torch.set_num_threads(before)


def test_bench_e2e_cpu_tiny(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "e2e.json"
    opts = BenchE2EOptions(model=str(cfg), schemes=("bf16", "int8-channel"), batch_sizes=(1, 3), input_len=6,
                           output_len=4, device="cpu", hf_peer=True, out=out, command="test", git_sha="abc123")
    results = run_bench_e2e(opts)
    on_disk = json.loads(out.read_text())
    assert on_disk["git"]["sha"] == "abc123" and on_disk["command"] == "test"
    assert [r["scheme"] for r in on_disk["runs"]] == ["bf16", "int8-channel"]
    assert [r["linear_kinds"] for r in on_disk["runs"]] == [["bf16"], ["int8-channel"]]
    for run in on_disk["runs"]:
        assert [b["batch"] for b in run["batches"]] == [1, 3]
        for b in run["batches"]:
            assert b["output_tokens_per_s"] > 0 and b["ttft_ms_median"] > 0 and b["tpot_ms_median"] > 0
            assert b["preemptions"] == 0
            assert len(b["wall_s_runs"]) == 3 and b["wall_s"] == sorted(b["wall_s_runs"])[1]  # the median run
    # ratio = int8 tokens/s over bf16 tokens/s of the same batch
    bf16, int8 = on_disk["runs"]
    for i, b in enumerate((1, 3)):
        want = round(int8["batches"][i]["output_tokens_per_s"] / bf16["batches"][i]["output_tokens_per_s"], 3)
        assert on_disk["ratios"]["vs_bf16_tokens_per_s"]["int8-channel"][str(b)] == want
    # int8 weights are ~half the bytes of bf16 per decode token (embedding row, lm_head, norms stay bf16)
    assert int8["decode_read"]["weights"] < bf16["decode_read"]["weights"]
    assert on_disk["hf_peer"]["status"] == "ok", on_disk["hf_peer"]
    assert on_disk["hf_peer"]["weights_copied"]["missing"] == 0
    # what the peer ran: static cache, compiled or not (never on CPU), warm-up calls identical to the timed ones
    peer = on_disk["hf_peer"]
    assert peer["static_cache"] and peer["compiled"] is False and "not compiled" in peer["compile_note"]
    row = peer["batches"][0]
    assert set(row["warmup_s"]) == set(row["timed_s"]) == {"4", "1"}
    assert all(len(t) == 2 for t in row["timed_s"].values())
    assert "bf16_vs_hf_generate_batch1" in on_disk["ratios"]
    assert any("transformers" in name for name in on_disk["targets"])
    assert results["targets"] == on_disk["targets"]


def test_decode_bytes_counts_each_tensor_once_and_one_embedding_row():
    from ingot.models.loader import random_model

    model = random_model(dict(TINY), "bf16", "cpu")
    read = decode_bytes_per_token(model, TINY)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    assert read["weights"] == params - embed.numel() * 2 + embed.shape[1] * 2
    tied = random_model({**TINY, "tie_word_embeddings": True}, "bf16", "cpu")
    assert decode_bytes_per_token(tied, TINY)["weights"] == sum(p.numel() * 2 for p in tied.parameters())


def test_targets_pass_and_fail():
    def run(scheme, tps1, tps64, tpot_s, total_bytes):
        return {"scheme": scheme, "decode_read": {"total": total_bytes},
                "batches": [{"batch": 1, "output_tokens_per_s": tps1, "decode_tokens_per_s_per_seq": 1 / tpot_s},
                            {"batch": 64, "output_tokens_per_s": tps64}]}

    runs = [run("bf16", 100.0, 1000.0, 0.01, 1e9), run("int8-channel", 170.0, 1500.0, 0.006, 5e8)]
    hf = {"status": "ok", "batches": [{"batch": 1, "output_tokens_per_s": 40.0}]}
    ratios, targets = ratios_and_targets(runs, hf, {"gbps": 100.0})  # roofline: 100 tok/s bf16, 200 int8
    assert ratios["vs_bf16_tokens_per_s"]["int8-channel"] == {"1": 1.7, "64": 1.5}
    assert targets["int8-channel >= 1.6x BF16 tokens/s at batch 1"]["pass"]
    assert not targets["int8-channel >= 1.6x BF16 tokens/s at batch 64"]["pass"]
    assert ratios["batch1_decode_fraction_of_roofline"] == {"bf16": 1.0, "int8-channel": 0.833}
    assert ratios["bf16_vs_hf_generate_batch1"] == 2.5


def test_options_validation():
    with pytest.raises(ValueError, match="pass --layers"):
        BenchE2EOptions(model="deepseek-v3")
    with pytest.raises(ValueError, match="scheme 'int3'"):
        BenchE2EOptions(schemes=("int3",))
    with pytest.raises(ValueError, match="neither a preset"):
        model_config(BenchE2EOptions(model="/nonexistent/config.json"))
    assert model_config(BenchE2EOptions(model="deepseek-v3", layers=4))["num_hidden_layers"] == 4


def test_cli_bench_e2e(tmp_path, capsys):
    from ingot.cli import main

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "r.json"
    assert main(["bench", "e2e", "--random-weights", str(cfg), "--schemes", "bf16", "int8-block", "--batch-sizes", "2",
                 "--input-len", "5", "--output-len", "3", "--device", "cpu", "--no-hf", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["hf_peer"]["status"] == "skipped: --no-hf" and results["command"].startswith("ingot ")
    assert set(results["ratios"]["vs_bf16_tokens_per_s"]) == {"int8-block"}
    assert "int8-block" in capsys.readouterr().out
    assert main(["bench", "e2e", "--random-weights", "deepseek-v3", "--device", "cpu"]) == 1  # needs --layers


def test_hf_peer_falls_back_to_eager_when_compiled_timings_are_unstable(monkeypatch):
    """A compiled peer whose identical timed calls disagree (a recompile inside the timing) is measured again with
    transformers' compile disabled, and the JSON says why."""
    import ingot.bench.e2e as e2e

    calls = []

    def fake_batch(hf, b, config, options, device, gen):
        calls.append(dict(gen))
        hf._compiled_call = object()  # as transformers' get_compiled_call leaves it
        stable = gen.get("disable_compile", False)
        return {"batch": b, "output_tokens_per_s": 1.0, "tpot_ms": 1.0, "timed_s": {"4": [1.0, 1.0 if stable else 9.0]},
                "stable": stable}

    monkeypatch.setattr(e2e, "_hf_batch", fake_batch)
    opts = BenchE2EOptions(model="x", schemes=("bf16",), batch_sizes=(1,), input_len=3, output_len=4, device="cpu")
    peer = e2e.bench_hf(dict(TINY), opts, torch.device("cpu"))
    assert peer["status"] == "ok" and peer["compiled"] is False and "compile disabled" in peer["compile_note"]
    assert [c.get("disable_compile") for c in calls] == [None, True] and peer["generate"]["disable_compile"] is True
