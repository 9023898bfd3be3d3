"""Perplexity through the compressed cache: exact without compression, really reads the cache with it."""

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_tiny_model

from kvpress_aqua.cli import main
from kvpress_aqua.evaluation.perplexity import perplexity
from kvpress_aqua.policies import H2O, SlidingWindow


def _ids(n=96, seed=0):
    return torch.randint(4, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _reference_nll(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return F.cross_entropy(logits.float(), ids[0, 1:]).item()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("chunk", [1, 7, 32])
def test_dense_cache_equals_one_full_forward(arch, chunk):
    model = make_tiny_model(arch)
    ids = _ids()
    result = perplexity(model, ids, chunk=chunk)
    assert result.tokens == ids.shape[1] - 1
    assert result.nll == pytest.approx(_reference_nll(model, ids), abs=1e-4)
    assert result.kv_bytes == result.dense_kv_bytes


def test_budget_above_the_text_is_exact():
    model = make_tiny_model("llama")
    ids = _ids()
    result = perplexity(model, ids, [H2O(heavy=100, recent=20)], chunk=8)
    assert result.nll == pytest.approx(_reference_nll(model, ids), abs=1e-4)


@pytest.mark.parametrize("policy", [H2O(heavy=8, recent=8, sinks=2), SlidingWindow(sinks=2, window=14)],
                         ids=["h2o", "sliding"])
def test_compression_is_in_the_loop(policy):
    model = make_tiny_model("llama")
    ids = _ids(160)
    dense = perplexity(model, ids, chunk=4)
    squeezed = perplexity(model, ids, [policy], chunk=4)
    # the predictions read the evicted cache: the loss changes, and fewer bytes are held
    assert abs(squeezed.nll - dense.nll) > 1e-3
    assert squeezed.kv_bytes < 0.5 * squeezed.dense_kv_bytes
    assert squeezed.ppl == pytest.approx(torch.tensor(squeezed.nll).exp().item())


def test_progress_callback_and_errors():
    model = make_tiny_model("llama")
    seen = []
    perplexity(model, _ids(20), chunk=6, on_chunk=seen.append)
    assert seen == [6, 6, 6, 1]
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, _ids(1))
    with pytest.raises(ValueError, match="chunk"):
        perplexity(model, _ids(), chunk=0)


def test_cli_bad_input(tmp_path, capsys):
    assert main(["ppl", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["ppl", "--policy", "bogus"]) == 2


@pytest.mark.slow
def test_cli_on_smollm2(tmp_path, capsys, smollm2):
    text = tmp_path / "t.txt"
    text.write_text("The river runs past the old mill and the children play on its banks every summer. " * 30)
    code = main(["ppl", "--text", str(text), "--tokens", "384", "--chunk", "64", "--json",
                 "--policy", "h2o:heavy=48,recent=48,sinks=4", "--policy", "sliding:sinks=4,window=92"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["policy"]: r for r in out["results"]}
    assert rows["full"]["delta_pct"] == 0 and rows["full"]["kv_fraction"] == 1
    assert rows["full"]["ppl"] < 5  # repetitive text is easy
    for name in ("h2o:heavy=48,recent=48,sinks=4", "sliding:sinks=4,window=92"):
        assert rows[name]["kv_fraction"] < 0.5


def test_no_future_warning_from_the_cache_argument():
    """transformers 5.24 renamed past_key_values= to cache=; the old name warns there."""
    import warnings

    model = make_tiny_model("qwen3")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        dense = perplexity(model, _ids(40), chunk=8)
        squeezed = perplexity(model, _ids(40), [H2O(heavy=8, recent=8, sinks=2)], chunk=8)
    assert dense.nll == pytest.approx(_reference_nll(model, _ids(40)), abs=1e-4)
    assert squeezed.kv_bytes < dense.kv_bytes


def test_cli_checks_threads_and_chunk_before_loading(monkeypatch, capsys):
    from kvpress_aqua import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for argv, shown in ((["--threads", "0"], "--threads 0"), (["--threads", "-1"], "--threads -1"),
                        (["--chunk", "0"], "--chunk 0")):
        assert main(["ppl", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {shown}:") and err.count("\n") == 1
