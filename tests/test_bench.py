"""``python -m hmn bench``: well-formed measurements on tiny sizes, and the naive cross-scale reference
computing the same function as the project's full-resolution cross-scale attention."""

from __future__ import annotations

import json

import pytest
import torch

from hmn.bench import CONFIGS, NaiveCrossScaleAttention, bench_main, build_config, count_flops, matmul_tflops, noisy_rows
from hmn.networks.attention import CrossScaleAttention


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """bench_main sets torch's thread count to its --threads (default 2) and leaves it so; restored after each test
    here, the later tests run with the count tests/conftest.py chose (1 on a one-core machine), whatever the order."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.numerics
def test_naive_reference_equals_the_full_resolution_attention():
    torch.manual_seed(0)
    fast = CrossScaleAttention(32, num_levels=3, num_heads=4, context_size=None).eval()
    naive = NaiveCrossScaleAttention.from_module(fast)
    feats = [torch.randn(2, 32, s, s) for s in (8, 4, 2)]
    with torch.no_grad():
        for a, b in zip(fast(feats), naive(feats)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert naive.attn is fast.attn  # the same parameters, not a copy


def test_reference_config_replaces_only_the_attention():
    net = build_config("reference:cross_scale_naive", "convnext_tiny", 64)
    assert type(net.attention.stages[0]).__name__ == "_Naive"
    ref = build_config("hmn:cross_scale_full", "convnext_tiny", 64)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in ref.parameters())


def test_bench_writes_one_json_line_per_measurement(capsys, tmp_path):
    out = tmp_path / "bench.jsonl"
    rc = bench_main(["--backbones", "convnext_tiny", "--size", "32", "--batch", "2", "--rounds", "2", "--warmup", "1",
                     "--configs", "bare", "hmn:none", "--no-memory", "--json", str(out)])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [(r["config"], r["mode"]) for r in lines] == [("bare", "train"), ("bare", "infer"), ("hmn:none", "train"),
                                                          ("hmn:none", "infer")]
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines
    for r in lines:
        assert len(r["step_s_all"]) == 2 and r["step_s"] == pytest.approx(sorted(r["step_s_all"])[0] / 2 + sorted(r["step_s_all"])[1] / 2)
        assert r["images_per_s"] == pytest.approx(2 / r["step_s"])
        assert r["step_spread"] == pytest.approx(max(r["step_s_all"]) / min(r["step_s_all"]))
        assert r["device"] == "cpu" and r["precision"] == "fp32" and r["peak_mib"] is None
    bare = {r["mode"]: r["step_s"] for r in lines if r["config"] == "bare"}
    for r in lines:
        assert r["time_ratio_to_bare"] == pytest.approx(r["step_s"] / bare[r["mode"]])


@pytest.mark.slow  # 9 s: a child process per measurement
def test_cpu_memory_is_measured_in_a_child_process(capsys):
    assert bench_main(["--backbones", "convnext_tiny", "--size", "32", "--batch", "2", "--rounds", "1", "--warmup", "1",
                       "--configs", "bare", "--modes", "train", "--precision", "bf16"]) == 0
    (r,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert r["peak_kind"] == "cpu peak RSS growth over one step" and r["peak_mib"] >= 0
    assert r["precision"] == "bf16"


def test_bad_arguments_are_refused(capsys):
    assert bench_main(["--backbones", "convnext_tinyy", "--no-memory"]) == 2
    assert "unknown backbone(s) ['convnext_tinyy']" in capsys.readouterr().err
    assert bench_main(["--backbones", "convnext3d_tiny", "--no-memory"]) == 2  # volumes: benchmarks/bench_3d.py
    assert "(3D backbones: benchmarks/bench_3d.py)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown configuration 'hmn:bogus'"):
        build_config("hmn:bogus", "convnext_tiny", 64)
    assert set(CONFIGS) >= {"bare", "hmn:bundle", "reference:cross_scale_naive"}


def test_flop_count_and_model_flops_utilisation(capsys):
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    assert count_flops(lambda: lin(x)) == 2 * 2 * 8 * 4  # one multiply-add per weight and sample
    assert count_flops(lambda: torch.nn.functional.conv2d(torch.randn(1, 3, 5, 5), torch.randn(6, 3, 3, 3))) == 2 * 6 * 3 * 9 * 3 * 3
    assert 0 < matmul_tflops("cpu", n=256, repeats=2) < 100
    assert bench_main(["--backbones", "convnext_tiny", "--size", "32", "--batch", "2", "--rounds", "1", "--warmup", "1",
                       "--configs", "bare", "--no-memory"]) == 0
    out = capsys.readouterr().out
    rows = {r["mode"]: r for r in (json.loads(x) for x in out.splitlines() if x.startswith("{"))}
    train, infer = rows["train"], rows["infer"]
    # the forward pass of convnext_tiny at 32x32: 4.5 GMAC per image at 224x224 (timm's figure for the ImageNet
    # model) scaled by (32/224)^2, two images, two operations per multiply-add: about 0.37 GFLOP (the stem sees one
    # channel here, not three, and the head 14 classes, not 1000)
    assert infer["flops_per_step"] == pytest.approx(4.5e9 * (32 / 224) ** 2 * 2 * 2, rel=0.05)
    assert train["flops_per_step"] == 3 * infer["flops_per_step"]  # backward counted as twice the forward
    for r in (train, infer):
        assert r["model_tflops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] / r["matmul_tflops"]) and 0 < r["mfu"] < 1
    assert "matrix products" in out and "| MFU |" in out
    assert bench_main(["--backbones", "convnext_tiny", "--size", "32", "--batch", "2", "--rounds", "1", "--warmup", "1",
                       "--configs", "bare", "--modes", "infer", "--no-memory", "--no-flops"]) == 0
    (r,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert r["flops_per_step"] is None and r["mfu"] is None and r["matmul_tflops"] is None


def test_noisy_measurements_are_named():
    rows = [{"backbone": "convnext_tiny", "config": c, "mode": "train", "step_spread": sp}
            for c, sp in (("bare", 1.1), ("hmn:self", 9.3 / 0.6), ("hmn:none", None))]
    assert noisy_rows(rows) == ["convnext_tiny hmn:self train (15.5x)"]
    assert noisy_rows(rows, limit=1.05) == ["convnext_tiny bare train (1.1x)", "convnext_tiny hmn:self train (15.5x)"]
