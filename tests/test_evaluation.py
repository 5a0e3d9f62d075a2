"""``ncm eval`` (ncmcli/evaluation.py) beyond its JSON keys, which test_plots_and_eval covers."""

from ncmcli.config.presets import resolve
from conftest import untrained_file


def test_eval_honours_the_batch_size(tmp_path, monkeypatch):
    from ncmcli import evaluation, forward
    from ncmcli.data.datasets import FASHION_CLASSES

    ck = untrained_file(tmp_path, classes=list(FASHION_CLASSES))
    seen = []
    real = forward.evaluate

    def spy(*a, **k):
        seen.append(k["batch_size"])
        return real(*a, **k)

    monkeypatch.setattr(forward, "evaluate", spy)
    evaluation.eval_command(ck, data_root=None, device="cpu", limit=100, batch_size=16)
    evaluation.eval_command(ck, data_root=None, device="cpu", limit=100)
    assert seen == [16, resolve("quickstart").train.eval_batch_size]
