"""`python -m benchmarks.gpu_step --tiny` on the CPU: one JSON object last, with every field and sane values.

No timing is asserted (CI machines vary); the GPU numbers come from running the script on a GPU machine.
"""

from __future__ import annotations

import json

from benchmarks.gpu_step import main, with_layers
from engine.plan import load_preset


def test_tiny_run_prints_one_json_object_last(capsys, tmp_path) -> None:
    out = tmp_path / "gpu_step.json"
    status = main(["--tiny", "--quantize", "none", "int4", "--repeats", "1", "--warmup", "0", "--denoise-steps", "2",
                   "--json-out", str(out)])
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert status == 0 and json.loads(out.read_text()) == summary
    assert "[gpu_step]" in captured.err  # progress goes to stderr
    assert summary["benchmark"] == "gpu_step" and summary["device"] == "cpu" and summary["model"] == "tiny"
    assert [row["quantize"] for row in summary["results"]] == ["none", "int4"]
    for row in summary["results"]:
        for key in ("prefill_ms", "decoder_step_ms", "denoise_step_ms", "decoder_step_ms_2_layers"):
            assert row[key] > 0
        assert row["layers"] == 2 and row["logits_finite"] is True
        assert 0 < row["peak_memory_gb"] < 64 and row["planned_peak_gb"] > 0
        assert row["floor_ms"] is None  # no bandwidth for a CPU unless --bandwidth-gbs
        assert row["fast_step_eager_ms"] > 0 and row["fast_step_graph_ms"] is None  # no CUDA graph on a CPU
        assert row["fast_step_graph"] is False and row["fast_step_error"] is None
        assert 0.9 <= row["fast_step_agreement"] <= 1.0 and row["fast_step_peak_gb"] > 0
    none, int4 = summary["results"]
    assert none["quantized_fraction"] == 0 and int4["quantized_fraction"] > 0.3
    assert int4["weight_bytes"] < none["weight_bytes"]


def test_bandwidth_gives_a_floor_and_layers_follow_the_real_pattern(capsys) -> None:
    main(["--tiny", "--quantize", "int8", "--repeats", "1", "--warmup", "0", "--denoise-steps", "1",
          "--bandwidth-gbs", "100"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]
    assert row["floor_ms"] > 0 and row["step_vs_floor"] > 0
    twelve = with_layers(load_preset("diffusiongemma-26b-a4b"), 12)["text_config"]
    assert twelve["num_hidden_layers"] == 12
    assert [i for i, kind in enumerate(twelve["layer_types"]) if kind == "full_attention"] == [5, 11]
