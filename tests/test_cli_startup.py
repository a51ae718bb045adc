"""Start-up and Ctrl-C: help and argument errors import no torch; Ctrl-C anywhere is one line and exit 130.

Speed itself is measured, not asserted (see docs/cli.md); what is asserted here is what makes
it fast: the parser path imports neither torch nor transformers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from factorlm.cli import main
from factorlm.cli.interrupt import INTERRUPTED
from factorlm.testing import save_tiny_dense, write_tiny_factored

HEAVY = ("torch", "transformers", "safetensors", "numpy")


def _python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_import_factorlm_is_light():
    proc = _python(f"""
        import sys, factorlm
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["compress", "--help"], ["finetune", "--help"], ["eval", "ppl", "--help"],
                                  ["bench", "offline", "--help"], ["compress", "x", "-o", "y", "--batch-size", "0"],
                                  ["compress", "x", "-o", "y", "--device", "bogus"], ["nope"]])
def test_help_and_argument_errors_import_no_torch(argv):
    proc = _python(f"""
        import sys
        from factorlm.cli import main
        try:
            code = main({argv!r})
        except SystemExit as exc:
            code = exc.code
        print("HEAVY", sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)
        sys.exit(code)
    """)
    assert proc.stderr.strip().splitlines()[-1] == "HEAVY []", proc.stderr
    if argv[-1] == "--help":
        assert proc.returncode == 0 and "usage: factorlm" in proc.stdout
    else:
        assert proc.returncode == 2
        errors = [line for line in proc.stderr.splitlines() if line.startswith("factorlm: error: ")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr


def test_import_factorlm_first_registers_when_transformers_loads(tmp_path):
    path = write_tiny_factored(tmp_path / "ck", rank=8)
    proc = _python("""
        import sys
        import factorlm
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        print(type(model.model.layers[0].self_attn.q_proj).__name__)
    """, str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "FactoredLinear"


def test_import_factorlm_after_transformers_registers_at_once(tmp_path):
    """Before ``import factorlm`` transformers does not know the method (and loads the wrong model); after, it does."""
    path = write_tiny_factored(tmp_path / "ck", rank=8)
    proc = _python("""
        import sys
        from transformers import AutoModelForCausalLM
        import transformers.quantizers.auto
        print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1]).model.layers[0].self_attn.q_proj).__name__)
        import factorlm
        print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1]).model.layers[0].self_attn.q_proj).__name__)
    """, str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Linear", "FactoredLinear"]


# ----------------------------------------------------------------------------- Ctrl-C


PARTIAL = ".out.factorlm-partial"  # the resumable folder a killed compression leaves


def _interrupt_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line == INTERRUPTED]


def test_ctrl_c_during_compression_in_process(tmp_path, capsys, monkeypatch):
    dense = save_tiny_dense(tmp_path / "dense")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("factorlm.compressor.pipeline.compress_model", interrupted)  # the in-RAM path
    monkeypatch.setattr("factorlm.compressor.streamed._run", interrupted)  # the block-streamed path
    assert main(["compress", str(dense), "-o", str(tmp_path / "out"), "--no-progress"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == INTERRUPTED
    # no output; at most the one resumable partial folder, which the next run on this output reuses or removes
    assert set(p.name for p in tmp_path.iterdir()) <= {"dense", PARTIAL}


def test_ctrl_c_during_save_leaves_nothing(tmp_path, capsys, monkeypatch):
    dense = save_tiny_dense(tmp_path / "dense")
    from transformers import PreTrainedTokenizerFast

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)  # the model is written by then
        assert main(["compress", str(dense), "-o", str(tmp_path / "out"), "--no-progress"]) == 130
    assert _interrupt_lines(capsys.readouterr().err) == [INTERRUPTED]
    assert set(p.name for p in tmp_path.iterdir()) <= {"dense", PARTIAL}  # no output, one clearly named leftover
    # the next run on the same output (without --resume) starts afresh and removes the leftover
    assert main(["compress", str(dense), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "out"]


def _default_sigint() -> None:
    """In the child: SIGINT as a terminal delivers it (a test runner started in the background,
    e.g. under nohup, passes SIGINT on ignored, and Python keeps an inherited ignore)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_at_start_up(tmp_path):
    """SIGINT while the command is still importing torch: one line, 130, no traceback."""
    dense = save_tiny_dense(tmp_path / "dense")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from factorlm.cli import main
        print("ready", flush=True)
        sys.exit(main(sys.argv[1:]))
    """), "compress", str(dense), "-o", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert _interrupt_lines(err) == [INTERRUPTED] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_ctrl_c_during_a_long_native_call(tmp_path):
    """Tokenizing a large calibration text is one native call that never sees KeyboardInterrupt.

    The watchdog exits 130 within its grace period anyway and removes the partial output
    the run had started (here a ``.out.partial-*`` folder the patched step creates).
    """
    dense = save_tiny_dense(tmp_path / "dense")
    calib = tmp_path / "calib.txt"
    calib.write_text("hello world the quick brown fox " * 250_000)  # ~5M tokens: 20 s or more of tokenizing
    out = tmp_path / "out"
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        import factorlm.compressor.calib_sources as cs

        original = cs.source_ids

        def marked(tokenizer, source):
            out = Path(sys.argv[3])
            (out.parent / f".{out.name}.partial-test").mkdir()
            print("TOKENIZING", file=sys.stderr, flush=True)
            return original(tokenizer, source)

        cs.source_ids = marked
        from factorlm.cli import main
        sys.exit(main(["compress", sys.argv[1], "--calib", sys.argv[2], "-o", sys.argv[3], "--method", "svd-llm",
                       "--calib-len", "32", "--calib-samples", "4", "--no-progress"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(dense), str(calib), str(out)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                            preexec_fn=_default_sigint)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.strip() == "TOKENIZING":
            break
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        rest = proc.stderr.read()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    waited = time.monotonic() - sent
    err = "".join(lines) + rest
    assert proc.returncode == 130, err
    assert _interrupt_lines(err) == [INTERRUPTED] and "Traceback" not in err
    assert waited < 10, f"took {waited:.1f} s to stop"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "dense"]
