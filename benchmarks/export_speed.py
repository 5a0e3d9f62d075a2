"""Benchmark 7: inference images/s of an exported model (onnxruntime, TorchScript) beside the
PyTorch model it came from, on the CPU, for the quickstart net and the paper's CIFAR-10 net.
Preprocessing (uint8 -> normalised) is inside all three.

    python benchmarks/export_speed.py [--batch 256] [--reps 10]
"""

import tempfile
from pathlib import Path

import torch
from _common import parse, timed

from ncmcli.commands.export import Exported, export
from ncmcli.config.presets import resolve
from ncmcli.nn.classifier import Classifier
from ncmcli.runs import checkpoint


def main() -> None:
    args = parse(__doc__.splitlines()[0], batch=(int, 256, "images per call"), reps=(int, 10, "timed calls"))
    import onnxruntime as ort

    batch, reps = (4, 1) if args.dry_run else (args.batch, args.reps)
    print(f"threads: {torch.get_num_threads()}, batch {batch}, {reps} timed calls after 1 warm-up")
    print(f"{'net':10} {'PyTorch img/s':>14} {'ONNX Runtime':>13} {'TorchScript':>12} {'ONNX/PyTorch':>13}")
    cases = [("tiny", (1, 28, 28))] + ([] if args.dry_run else [("cifar10", (3, 32, 32))])
    for arch, shape in cases:
        cfg = resolve("quickstart", [f"model.arch={arch}"])
        torch.manual_seed(0)
        clf = Classifier.from_config(cfg, 10, shape, mean=[0.5] * shape[0], std=[0.25] * shape[0])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ck.safetensors"
            checkpoint.save(path, clf, config=cfg, epoch=0, metrics={})
            ck = checkpoint.load(path)
            onnx_file = export(ck, "onnx", Path(tmp) / "m.onnx")
            ts_file = export(ck, "torchscript", Path(tmp) / "m.pt")
            session = ort.InferenceSession(str(onnx_file))
            scripted = torch.jit.load(str(ts_file))
            eager = Exported(ck.classifier).eval()
            x = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8)
            with torch.no_grad():
                t_torch = timed(lambda: eager(x), reps=reps)
                t_ts = timed(lambda: scripted(x), reps=reps)
            xn = x.numpy()
            t_onnx = timed(lambda: session.run(None, {"images": xn}), reps=reps)
        print(
            f"{arch:10} {batch / t_torch:14.0f} {batch / t_onnx:13.0f} {batch / t_ts:12.0f} {t_torch / t_onnx:13.2f}"
        )


if __name__ == "__main__":
    main()
