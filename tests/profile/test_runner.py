"""The profile loop with the model replaced: report contents, Ctrl-C, failures, atomic writes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from rich.console import Console

from vishwamai_edge.profile import report as rpt
from vishwamai_edge.profile import runner
from vishwamai_edge.profile.outputs import write_outputs
from vishwamai_edge.runtime.backends import MemoryUse
from vishwamai_edge.runtime.options import RuntimeOptions
from vishwamai_edge.runtime.pipeline import Pipeline

QUIET = Console(quiet=True)


class FakePipeline:
    def __init__(self, bundle):
        self.bundle = bundle
        self.llm = SimpleNamespace(memory=lambda: MemoryUse(1_000_000, 200_000, 5_000_000))
        self.closed = False

    def close(self):
        self.closed = True


def timings(prompt_tokens: int, decode_tps: float) -> dict:
    decode_tokens = 16
    return {"prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "tokenize_s": 0.001,
            "encode_s": 0.0,
            "prefill_s": prompt_tokens / 1000, "first_token_s": 0.002, "ttft_s": prompt_tokens / 1000 + 0.003,
            "decode_s": decode_tokens / decode_tps, "forced_tokens": 0, "finish": "length",
            "prefill_tps": 1000.0, "decode_tps": decode_tps,
            "context_mean": prompt_tokens + decode_tokens / 2}


@pytest.fixture
def fake_model(monkeypatch):
    """Pipeline.load returns a stand-in; _run_once is scripted per scenario."""
    from vishwamai_edge.runtime.bundle import Bundle

    loaded = []

    def load(cls, path, n_ctx=None, n_threads=None, verify=True, kv_type=None):
        p = FakePipeline(Bundle.load(path, verify=False))
        loaded.append(p)
        return p

    monkeypatch.setattr(Pipeline, "load", classmethod(load))
    script = {"chat": lambda: timings(40, 100.0), "prompt-512": lambda: timings(512, 80.0)}

    def run_once(s, pipeline, raw, decode_tokens):
        return script[s.name]()

    monkeypatch.setattr(runner, "_run_once", run_once)
    monkeypatch.setattr(runner, "device_monitor", lambda: None)
    return SimpleNamespace(script=script, loaded=loaded)


def test_report_of_two_bundles(fake_model, fake_bundle, tmp_path):
    out = tmp_path / "out"
    result = runner.run_profile([fake_bundle, fake_bundle], out, "chat,prompt-512,image", repeat=3, warmup=1, console=QUIET, options=RuntimeOptions(n_threads=2))
    data = rpt.load_report(out / "report.json")
    assert data == json.loads(json.dumps(result.report))
    assert data["status"] == "complete"
    assert data["settings"]["n_ctx"] == 768 and data["settings"]["threads"] == 2
    assert [b["label"] for b in data["bundles"]] == ["q4_k_m", "q4_k_m#2"]
    b = data["bundles"][0]
    assert b["model"]["n_layer"] == 4
    assert b["bandwidth"] == {"target": "laptop-cpu", "gbs": 50, "source": "bundle manifest"}
    assert len(b["load"]["runs_s"]) == 3 and b["load"]["load_s"]["n"] == 3
    chat = b["scenarios"]["chat"]
    assert chat["status"] == "ok" and len(chat["runs"]) == 3  # the warm-up run is not kept
    assert chat["summary"]["decode_tps"]["median"] == 100.0
    # roofline: 100 tok/s x (file + 48 positions of f16 KV) / 50 GB/s
    per_token = b["file_bytes"] + 48 * (2 * 4 * 2 * 8 * 2)
    assert chat["summary"]["roofline_ratio"]["median"] == pytest.approx(100 * per_token / 50e9)
    image = b["scenarios"]["image"]
    assert (image["status"], image["reason"]) == (
        "skipped", "the bundle has no image encoder (its manifest lists no encoders.image)")
    assert "runs" not in image
    assert b["memory"]["peak_rss_bytes"] >= b["memory"]["baseline_rss_bytes"] > 0
    assert b["timeline"]["rss"] and [m for _, m in b["timeline"]["marks"]] == ["load", "chat", "prompt-512"]
    assert all(p.closed for p in fake_model.loaded)
    assert any("none of these bundles has any" in n for n in data["notes"])

    md = (out / "report.md").read_text()
    assert "### Side by side" in md and "### Decode tokens/s against context" in md
    assert "| q4_k_m | 100.0 (100.0-100.0) | 80.0 (80.0-80.0) |" in md
    assert "the bundle has no image encoder" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "http" not in page.replace("http-equiv", "")
    for rel in data["plots"].values():
        assert_png(out / rel)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def assert_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_ctrl_c_keeps_finished_scenarios(fake_model, fake_bundle, tmp_path):
    calls = []

    def interrupt():
        calls.append(1)
        raise KeyboardInterrupt

    fake_model.script["prompt-512"] = interrupt
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        runner.run_profile([fake_bundle], out, "chat,prompt-512", repeat=2, warmup=0, console=QUIET)
    data = rpt.load_report(out / "report.json")
    assert data["status"] == "interrupted"
    b = data["bundles"][0]
    assert b["status"] == "interrupted" and b["interrupted_during"] == "prompt-512"
    assert b["scenarios"]["chat"]["status"] == "ok" and len(b["scenarios"]["chat"]["runs"]) == 2
    assert "prompt-512" not in b["scenarios"]
    assert any("interrupted" in n for n in data["notes"])
    assert "Status: **interrupted**" in (out / "report.md").read_text()
    for rel in data["plots"].values():
        assert_png(out / rel)
    assert fake_model.loaded[-1].closed


def test_report_is_on_disk_after_each_scenario(fake_model, fake_bundle, tmp_path):
    """A kill -9 after a scenario still leaves a report of it: it is written before the next starts."""
    out = tmp_path / "out"
    seen = []

    def second():
        seen.append(rpt.load_report(out / "report.json"))
        return timings(512, 80.0)

    fake_model.script["prompt-512"] = second
    runner.run_profile([fake_bundle], out, "chat,prompt-512", repeat=1, warmup=0, console=QUIET)
    assert seen[0]["status"] == "running"
    assert seen[0]["bundles"][0]["scenarios"]["chat"]["status"] == "ok"


def test_failed_scenario_does_not_stop_the_rest(fake_model, fake_bundle, tmp_path):
    def broken():
        raise RuntimeError("llama_decode failed with code 1")

    fake_model.script["chat"] = broken
    out = tmp_path / "out"
    result = runner.run_profile([fake_bundle], out, "chat,prompt-512", repeat=1, warmup=0, console=QUIET)
    sc = result.report["bundles"][0]["scenarios"]
    assert sc["chat"]["status"] == "failed" and "llama_decode failed" in sc["chat"]["error"]
    assert sc["prompt-512"]["status"] == "ok"
    assert result.report["status"] == "complete"


def test_target_flag_sets_bandwidth(fake_model, fake_bundle, tmp_path):
    result = runner.run_profile([fake_bundle], tmp_path / "o", "chat", repeat=1, warmup=0,
                                target="orin-nx-16", console=QUIET)
    bandwidth = result.report["bundles"][0]["bandwidth"]
    assert bandwidth == {"target": "orin-nx-16", "gbs": 102.4, "source": "--target"}


def test_bad_arguments(fake_bundle, tmp_path):
    from vishwamai_edge.errors import BundleError, UserError

    with pytest.raises(BundleError, match="does not exist"):
        runner.run_profile([tmp_path / "nope"], tmp_path / "o", console=QUIET)
    with pytest.raises(UserError, match="--repeat"):
        runner.run_profile([fake_bundle], tmp_path / "o", repeat=0, console=QUIET)
    with pytest.raises(UserError, match="unknown target"):
        runner.run_profile([fake_bundle], tmp_path / "o", target="pdp-11", console=QUIET)
    assert not (tmp_path / "o").exists()  # nothing written before the arguments are known good


def test_atomic_write_keeps_the_previous_report(tmp_path, monkeypatch, fake_bundle, fake_model):
    out = tmp_path / "out"
    runner.run_profile([fake_bundle], out, "chat", repeat=1, warmup=0, console=QUIET)
    before = (out / "report.md").read_text()
    report = rpt.load_report(out / "report.json")

    def explode(_report):
        raise OSError("disk full")

    monkeypatch.setattr("vishwamai_edge.profile.outputs.render_markdown", explode)
    with pytest.raises(OSError):
        write_outputs(out, report, final=False)
    assert (out / "report.md").read_text() == before
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_short_labels():
    names = ["smollm2-135m-laptop-cpu-f16", "smollm2-135m-laptop-cpu-q8_0", "smollm2-135m-laptop-cpu-q4_k_m"]
    assert rpt.short_labels(names) == ["f16", "q8_0", "q4_k_m"]
    assert rpt.short_labels(["m-laptop-cpu-f16", "m-orin-nx-16-f16"]) == ["laptop-cpu-f16", "orin-nx-16-f16"]
    assert rpt.short_labels(["a-f16", "a-q8_0", "a-q4_k_m"]) == ["f16", "q8_0", "q4_k_m"]
    assert rpt.short_labels(["only-one"]) == ["only-one"]
    assert rpt.short_labels(["x", "x"]) == ["x", "x#2"]
