"""``ncm eval`` (ncmcli/evaluation.py) beyond its JSON keys, which test_plots_and_eval covers."""

from ncmcli.config.presets import resolve
from conftest import save_untrained


def _save(tmp_path, preset="quickstart", name="ck.safetensors", classes=None):
    return save_untrained(tmp_path / name, preset, classes=classes)[0]


def test_eval_honours_the_batch_size(tmp_path, monkeypatch):
    from ncmcli import evaluation, forward
    from ncmcli.data.datasets import FASHION_CLASSES

    ck = _save(tmp_path, classes=list(FASHION_CLASSES))
    seen = []
    real = forward.evaluate

    def spy(*a, **k):
        seen.append(k["batch_size"])
        return real(*a, **k)

    monkeypatch.setattr(forward, "evaluate", spy)
    evaluation.eval_command(ck, data_root=None, device="cpu", limit=100, batch_size=16)
    evaluation.eval_command(ck, data_root=None, device="cpu", limit=100)
    assert seen == [16, resolve("quickstart").train.eval_batch_size]
