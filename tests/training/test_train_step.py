"""Training on a fixed batch with a tiny model lowers the loss; padding is exact; the export reloads."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoTokenizer, DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerFast

from engine.training import examples, export, model_config, objective
from engine.training.tokenizer import MASK_ID


def _batch(tokenizer: PreTrainedTokenizerFast) -> examples.Batch:
    cuts = [("def add(a, b):\n    return ", "a + b", "\n"),
            ("for i in range(10):\n    ", "print(i)", "\n"),
            ("class Point:\n    def __init__(self, x, y):\n        self.x = x\n", "        self.y = y\n", ""),
            ("import os\n", "", "import sys\n")]
    built = [examples.build(tokenizer, p, m, s, "line") for p, m, s in cuts]
    return examples.collate([e for e in built if e is not None])


def _tiny(tokenizer: PreTrainedTokenizerFast) -> DiffusionGemmaForBlockDiffusion:
    return model_config.build_model(model_config.build_config("tiny", vocab_size=len(tokenizer)))


def test_a_few_steps_reduce_the_loss(tokenizer: PreTrainedTokenizerFast) -> None:
    torch.set_num_threads(1)
    model, batch = _tiny(tokenizer), _batch(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def measured() -> float:
        with torch.no_grad():
            return objective.loss(model, batch, torch.Generator().manual_seed(0), 0.0).item()

    before = measured()
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        value = objective.loss(model, batch, generator, noise_copies=2, ar_weight=0.5)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert measured() < before - 0.5


def test_losses_report_canvas_and_encoder_parts(tokenizer: PreTrainedTokenizerFast) -> None:
    model, batch = _tiny(tokenizer), _batch(tokenizer)
    parts = objective.losses(model, batch, torch.Generator().manual_seed(0), ar_weight=0.5)
    assert set(parts) == {"canvas", "encoder_ar", "total"}
    assert torch.isclose(parts["total"], parts["canvas"] + 0.5 * parts["encoder_ar"])
    assert set(objective.losses(model, batch, torch.Generator().manual_seed(0))) == {"canvas", "total"}


def test_left_padded_batch_matches_single_examples(tokenizer: PreTrainedTokenizerFast) -> None:
    model, batch = _tiny(tokenizer).eval(), _batch(tokenizer)
    noisy = batch.canvas.clone()
    noisy[:, ::3] = MASK_ID
    with torch.no_grad():
        together = objective.canvas_logits(model, batch, noisy, None)
        for row in range(batch.canvas.shape[0]):
            width = int(batch.attention_mask[row].sum())
            single = examples.Batch(*(getattr(batch, f)[row : row + 1] for f in examples.Batch.__slots__))
            single = examples.Batch(single.input_ids[:, -width:], single.attention_mask[:, -width:],
                                    single.position_ids[:, -width:], single.canvas,
                                    single.decoder_attention_mask[:, -width - examples.CANVAS_LENGTH:],
                                    single.decoder_position_ids)
            alone = objective.canvas_logits(model, single, noisy[row : row + 1], None)
            assert torch.allclose(together[row], alone[0], atol=1e-4)


def test_export_reloads_with_transformers(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    model = _tiny(tokenizer)
    target = tmp_path / "default_model"
    sources = {"train": {"stdlib": {"license": "PSF-2.0", "language": "python", "files": 1, "chars": 10}}}
    export.write(model, tokenizer, target, sources=sources, training={"steps": 0})
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "SOURCES.md", "SOURCES.json"} <= names
    config = json.loads((target / "config.json").read_text())
    assert (config["dgls_noise"], config["dgls_mask_token_id"], config["dgls_template"]) == ("mask", 3, "dgls-fim")
    assert config["canvas_length"] == examples.CANVAS_LENGTH
    assert config["text_config"]["layer_types"][-1] == "full_attention"
    assert DiffusionGemmaConfig.from_pretrained(str(target)).dgls_noise == "mask"
    reloaded = DiffusionGemmaForBlockDiffusion.from_pretrained(str(target), dtype=torch.float32)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    generation = reloaded.generation_config
    assert generation.eos_token_id == 1 and generation.max_new_tokens == examples.CANVAS_LENGTH
    assert generation.sampler_config.entropy_bound > 0
    loaded_tokenizer = AutoTokenizer.from_pretrained(str(target))
    assert loaded_tokenizer.mask_token_id == MASK_ID
    export.write(model, tokenizer, target)  # overwriting an existing export leaves no staging dirs behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default_model"]


def test_noise_follows_the_canvas_device_with_the_same_draws() -> None:
    """The noise is drawn on the CPU generator and lands where the canvas is (a CUDA run trains on the same draws)."""
    canvas = torch.arange(64).reshape(4, 16) + 10
    on_cpu, cpu_mask = objective.add_noise(canvas, torch.Generator().manual_seed(3))
    on_meta, meta_mask = objective.add_noise(canvas.to("meta"), torch.Generator().manual_seed(3))
    assert on_meta.device.type == "meta" and meta_mask.device.type == "meta"
    assert cpu_mask.any(dim=1).all() and (on_cpu[cpu_mask] == MASK_ID).all()
    assert (on_cpu[~cpu_mask] == canvas[~cpu_mask]).all()


def test_worker_processes_make_batches_from_their_own_streams(tokenizer: PreTrainedTokenizerFast) -> None:
    from engine.training import train
    from engine.training.corpus import SourceFile

    files = [SourceFile(path=f"f{i}.py", text=text, language="python", package="p", license="MIT")
             for i, text in enumerate(SAMPLE_TEXTS)]
    args = train.parse_args(["--out", "unused", "--steps", "1", "--batch-size", "4", "--workers", "2"])
    stream = train.batch_stream(args, tokenizer, files, step=0)
    first, second = next(stream), next(stream)  # one from each worker (the loader alternates)
    for batch in (first, second):
        assert batch.input_ids.shape[0] == 4 and batch.canvas.shape == (4, examples.CANVAS_LENGTH)
    assert not torch.equal(first.canvas, second.canvas)
    in_process = next(train.batch_stream(train.parse_args(["--out", "unused", "--steps", "1", "--batch-size", "4"]),
                                         tokenizer, files, step=0))
    assert torch.equal(in_process.canvas, first.canvas)  # worker 0 draws what the training process would



def _run_dir(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> tuple[Path, Path]:
    from engine.training import corpus
    from engine.training.corpus import SourceFile

    files = [SourceFile(path=f"p/f{i}.py", text=text, language="python", package="p", license="MIT")
             for i, text in enumerate(SAMPLE_TEXTS * 3)]
    data = tmp_path / "corpus"
    data.mkdir()
    corpus.save(files, data / "train.jsonl")
    corpus.save(files[:2], data / "heldout.jsonl")
    (data / "sources.json").write_text(json.dumps({"train": {}, "heldout": {}}))
    out = tmp_path / "run"
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return data, out


def test_a_short_run_exports_a_model_that_loads(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    from engine.training import train

    data, out = _run_dir(tmp_path, tokenizer)
    train.main(["--out", str(out), "--corpus", str(data), "--preset", "tiny", "--steps", "4", "--batch-size", "4",
                "--log-every", "2", "--eval-every", "2", "--sdpa-kernels", "efficient,math"])
    record = json.loads((out / "model" / "TRAINING.json").read_text())
    assert record["steps"] == 4 and record["nonfinite_steps_skipped"] == 0
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(out / "model"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert train.parse_args(["--out", "x", "--steps", "1", "--device", "cuda"]).sdpa_kernels == train.CUDA_SDPA_KERNELS


def test_one_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path: Path, tokenizer: PreTrainedTokenizerFast,
                                                            monkeypatch) -> None:
    """A batch whose loss is NaN (what torch's default CUDA attention kernels produced) updates nothing; the step
    still logs, the run finishes and exports finite weights."""
    from engine.training import train

    data, out = _run_dir(tmp_path, tokenizer)
    real, calls = objective.losses, []

    def second_is_nan(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            parts["total"] = parts["total"] * float("nan")
        return parts

    monkeypatch.setattr(objective, "losses", second_is_nan)
    train.main(["--out", str(out), "--corpus", str(data), "--preset", "tiny", "--steps", "4", "--batch-size", "4",
                "--log-every", "1", "--eval-every", "1000"])
    record = json.loads((out / "model" / "TRAINING.json").read_text())
    assert record["steps"] == 4 and record["nonfinite_steps_skipped"] == 1
    logged = (out / "loss.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in logged[1:5]] == ["1", "2", "3", "4"]  # the skipped step logged too
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(out / "model"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_bad_kernel_name_is_refused_before_anything_loads(capsys) -> None:
    import pytest

    from engine.training import train

    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--steps", "1", "--sdpa-kernels", "efficient,fast"])
    assert "--sdpa-kernels: unknown fast; choose from flash, efficient, math, cudnn" in capsys.readouterr().err


def test_a_diverging_run_stops_with_a_clear_error_instead_of_exporting_nan(
        tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    import pytest

    from engine.training import train

    data, out = _run_dir(tmp_path, tokenizer)
    with pytest.raises(SystemExit, match="non-finite loss or gradient"):
        train.main(["--out", str(out), "--corpus", str(data), "--preset", "tiny", "--steps", "40", "--batch-size", "4",
                    "--lr", "1e30", "--warmup", "1", "--eval-every", "1000"])
    assert not (out / "model").exists()


SAMPLE_TEXTS = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def norm(self):\n"
    "        return (self.x ** 2 + self.y ** 2) ** 0.5\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n    else:\n        continue\nprint('done')\n",
]


def test_init_continues_an_exported_model(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """--init starts from an exported model's weights (not a fresh draw), keeps its tokenizer and sampler, and
    its record chains: each run's TRAINING.json holds the one before, with the chain's totals."""
    from engine.training import train

    data, out = _run_dir(tmp_path, tokenizer)
    common = ["--corpus", str(data), "--preset", "tiny", "--batch-size", "4", "--log-every", "2", "--eval-every", "2"]
    sampler = tmp_path / "sampler.json"
    sampler.write_text(json.dumps({"max_denoising_steps": 5, "t_max": 0.7, "entropy_bound": 0.9}))
    train.main(["--out", str(out), "--steps", "3", "--sampler", str(sampler), *common])
    first = DiffusionGemmaForBlockDiffusion.from_pretrained(str(out / "model"))
    again = tmp_path / "again"  # a budget of 0 steps (the minutes are a backstop): the weights pass through
    train.main(["--out", str(again), "--init", str(out / "model"), "--steps", "0", "--minutes", "0.05", *common])
    kept = DiffusionGemmaForBlockDiffusion.from_pretrained(str(again / "model"))
    theirs, ours = first.state_dict(), kept.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert (again / "tokenizer" / "tokenizer.json").read_bytes() == (out / "model" / "tokenizer.json").read_bytes()
    carried = json.loads((again / "model" / "generation_config.json").read_text())
    carried_sampler = (carried["max_denoising_steps"], carried["t_max"], carried["sampler_config"]["entropy_bound"])
    assert carried_sampler == (5, 0.7, 0.9)
    more = tmp_path / "more"
    train.main(["--out", str(more), "--init", str(again / "model"), "--steps", "2", *common])
    record = json.loads((more / "model" / "TRAINING.json").read_text())
    assert record["steps"] == 2 and record["total_steps"] == 5 and record["data_seed"] == 3
    before = record["initialized_from"]
    assert before["total_steps"] == 3 and before["initialized_from"]["steps"] == 3
    assert record["initialized_from"]["path"] == str((again / "model").resolve())
    assert len(record["initialized_from"]["model_sha256"]) == 64
    seconds = record["train_seconds"] + record["initialized_from"]["total_train_seconds"]
    assert record["total_train_seconds"] == pytest.approx(seconds, abs=0.11)


def test_a_resumed_continuation_keeps_its_chain(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """An interrupted --init run resumed from its checkpoint (and the export of that checkpoint) still says
    where it came from."""
    from engine.training import export, train

    data, out = _run_dir(tmp_path, tokenizer)
    common = ["--corpus", str(data), "--preset", "tiny", "--batch-size", "4", "--log-every", "2", "--eval-every", "2"]
    sampler = tmp_path / "sampler.json"
    sampler.write_text(json.dumps({"max_denoising_steps": 6, "t_max": 0.4}))
    train.main(["--out", str(out), "--steps", "2", "--sampler", str(sampler), *common])
    later = tmp_path / "later"
    (later / "tokenizer").mkdir(parents=True)  # an identical tokenizer already there is accepted
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (later / "tokenizer" / name).write_bytes((out / "model" / name).read_bytes())
    train.main(["--out", str(later), "--init", str(out / "model"), "--steps", "1", *common])
    train.main(["--out", str(later), "--resume", str(later / "checkpoint.pt"), "--steps", "2", *common])
    record = json.loads((later / "model" / "TRAINING.json").read_text())
    assert record["steps"] == 2 and record["total_steps"] == 4 and record["initialized_from"]["steps"] == 2
    config = json.loads((later / "model" / "generation_config.json").read_text())
    assert (config["max_denoising_steps"], config["t_max"]) == (6, 0.4)  # the init's sampler, through the resume
    with mock.patch.object(sys, "argv", ["export", str(later), str(tmp_path / "exported")]):
        export.main()
    exported = json.loads((tmp_path / "exported" / "TRAINING.json").read_text())
    assert exported["total_steps"] == 4 and exported["initialized_from"]["steps"] == 2
    assert json.loads((tmp_path / "exported" / "generation_config.json").read_text())["max_denoising_steps"] == 6


def test_init_refuses_another_architecture_or_tokenizer(tmp_path: Path, tokenizer: PreTrainedTokenizerFast,
                                                        capsys) -> None:
    from engine.training import train

    data, out = _run_dir(tmp_path, tokenizer)
    common = ["--corpus", str(data), "--batch-size", "4", "--log-every", "2", "--eval-every", "2"]
    train.main(["--out", str(out), "--steps", "1", "--preset", "tiny", *common])
    with pytest.raises(SystemExit, match="not preset 'small'.*give the --preset"):
        train.main(["--out", str(tmp_path / "big"), "--init", str(out / "model"), "--steps", "1", *common])
    other = tmp_path / "other"
    (other / "tokenizer").mkdir(parents=True)
    (other / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(SystemExit, match="differs from"):
        train.main(["--out", str(other), "--init", str(out / "model"), "--steps", "1", "--preset", "tiny", *common])
    refusals = [
        (["--init", str(tmp_path)], "no model.safetensors, config.json, tokenizer.json, tokenizer_config.json"),
        (["--init", str(out / "model"), "--resume", str(out / "checkpoint.pt")], "--init and --resume"),
        (["--init", str(out / "model"), "--out", str(out)], "holds one (checkpoint.pt)"),
        (["--sampler", str(tmp_path / "absent.json")], "no such file"),
    ]
    for extra, message in refusals:
        with pytest.raises(SystemExit):
            train.parse_args(["--out", str(tmp_path / "x"), "--steps", "1", *extra])
        assert message in capsys.readouterr().err


def test_a_tuned_sampler_reaches_the_re_export(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """The retrain recipe: evaluate --grid --sampler-out writes the best sampler, and exporting the run again
    carries it into generation_config.json while keeping the run's corpus record and history."""
    from engine.training import evaluate, export, train

    data, out = _run_dir(tmp_path, tokenizer)
    train.main(["--out", str(out), "--corpus", str(data), "--preset", "tiny", "--steps", "2", "--batch-size", "4",
                "--log-every", "2", "--eval-every", "2"])
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"prompt": "def f(x):\n", "suffix": "\n", "canonical_solution": "    return x"}) + "\n")
    argv = ["evaluate", str(out / "model"), "--tasks", str(tasks), "--limit", "1", "--grid",
            "--sampler-out", str(out / "sampler.json")]
    with mock.patch.object(sys, "argv", argv):
        evaluate.main()
    best = json.loads((out / "sampler.json").read_text())
    assert set(best) == set(export.DEFAULT_SAMPLER)
    assert best["max_denoising_steps"] in evaluate.GRID["max_denoising_steps"]
    with mock.patch.object(sys, "argv", ["export", str(out), str(tmp_path / "shipped")]):
        export.main()
    config = json.loads((tmp_path / "shipped" / "generation_config.json").read_text())
    assert (config["max_denoising_steps"], config["t_max"]) == (best["max_denoising_steps"], best["t_max"])
    assert (tmp_path / "shipped" / "SOURCES.md").exists()
    assert json.loads((tmp_path / "shipped" / "TRAINING.json").read_text())["train_files"] == 9
