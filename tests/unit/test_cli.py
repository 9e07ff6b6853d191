import json
import subprocess
import sys

import pytest

from ltk.cli import build_parser, main


@pytest.mark.parametrize("argv", [[], ["train"], ["generate"], ["lab"], ["lab", "run"], ["bench"],
                                  ["bench", "train-step"]])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    assert "usage: ltk" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["bench", "--help"],
                                  ["bench", "attention", "--help"],
                                  ["lab", "run", "--help"]])
def test_help_imports_no_torch_and_no_benchmark(argv):
    """`ltk --help` must answer at once: no torch (seconds of imports), no benchmark module.
    (How long it takes is measured by `ltk bench cli-startup`, not asserted here.)"""
    from ltk.bench.cli_startup import import_report

    report = import_report(argv)  # python -X importtime -m ltk ARGV, in a fresh process
    assert not report["imports_torch"], report["slowest_import"]
    assert not [m for m in report["ltk_modules"] if m.startswith("ltk.bench.")], report["ltk_modules"]
    assert "ltk.cli" in report["ltk_modules"]  # the report does see our imports


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "ltk.cli", "lab", "list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "pretrain" in out.stdout


def test_train_overrides_and_print_config(capsys):
    assert main(["train", "--preset", "gpt-debug", "--max-steps", "7", "--optim.lr", "1e-3",
                 "--model.n_layer=3", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["trainer"]["max_steps"] == 7 and cfg["optim"]["lr"] == 1e-3 and cfg["model"]["n_layer"] == 3


@pytest.mark.parametrize("argv, needle", [
    (["train", "--preset", "gpt-7"], "unknown preset"),
    (["train", "--trainer.max_stepz", "3", "--print-config"], "unknown config field"),
    (["train", "--data", "/no/such/corpus", "--max-steps", "1"], "/no/such/corpus"),
    (["generate", "--ckpt", "/no/such/run", "--prompt", "x"], "does not exist"),
    (["lab", "run", "nolab"], "unknown lab"),
])
def test_bad_input_is_a_clear_error(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_train_resume_and_generate_end_to_end(tiny_config, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run")
    run = str(tmp_path / "run")
    base = ["train", "--data", cfg.data.source, "--out", run, "--model.n_layer", "1", "--model.n_embd", "32",
            "--model.n_head", "2", "--model.block_size", "32", "--data.vocab_size", "300", "--data.min_chars", "16",
            "--trainer.batch_size", "4", "--trainer.eval_batches", "1", "--trainer.progress", "false",
            "--optim.decay_steps", "10"]
    assert main(base + ["--max-steps", "3"]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    assert main(["train", "--resume", run, "--max-steps", "5", "--trainer.progress", "false"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 5 and steps == sorted(steps)
    with pytest.raises(SystemExit, match="not both"):
        main(["train", "--resume", run, "--preset", "gpt-debug"])
    capsys.readouterr()
    assert main(["generate", "--ckpt", run, "--prompt", "alpha beta", "--max-new-tokens", "12"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("alpha beta") and len(text) > len("alpha beta")


def test_parser_has_the_documented_commands():
    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "cmd")
    assert {"train", "generate", "lab", "bench"} <= set(sub.choices)


def test_bench_json_prints_rows_with_provider_and_figures(capsys):
    pytest.importorskip("transformers")
    assert main(["bench", "train-step", "--batch-size", "2", "--seq-len", "16", "--min-time", "0.2",
                 "--rounds", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["provider"] for r in rows} == {"ours", "transformers"}
    for r in rows:
        assert r["throughput"] > 0 and r["throughput_unit"] == "tokens/s" and r["median_ms"] > 0
    assert main(["bench", "list"]) == 0 and "train-step" in capsys.readouterr().out


def test_generate_from_a_hugging_face_folder(tiny_config, tmp_path, capsys):
    """A transformers GPT-2 folder with a tokenizer.json generates through `ltk generate`."""
    transformers = pytest.importorskip("transformers")
    from ltk.training.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["alpha beta gamma delta " * 20, "def f(x): return x\n" * 20], 300)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32,
                                                              n_layer=1, n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer.json")
    capsys.readouterr()  # what saving printed (an installed DeepSpeed announces itself) is not the sample
    assert main(["generate", "--ckpt", str(tmp_path / "hf"), "--prompt", "alpha", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("alpha")
