"""`vtn evaluate`, `vtn predict`, `vtn report` and `vtn export`. Only argparse at module level, so `vtn --help` stays instant."""

from __future__ import annotations


def register(sub) -> None:
    """Add `vtn evaluate`, `vtn predict`, `vtn report` and `vtn export` to `vtn`."""
    for add in (_add_evaluate, _add_predict, _add_report, _add_export):
        add(sub)


def _add_evaluate(sub) -> None:
    from vtn.config import add_config_args  # light (yaml only)

    p = sub.add_parser(
        "evaluate", help="accuracy of a trained run on a split of a cache (whole videos)",
        description="Load RUN's best checkpoint (or RUN itself, when it is a checkpoint directory), run one view over "
        "each whole video of the split (one cached frame in the model's view_stride, up to its max_positions), "
        "print top-1, top-5 and mean class accuracy, and write predictions.csv, confusion.csv and metrics.json into "
        "RUN (or --out).",
    )
    p.add_argument("run", help="a `vtn train` run directory, or a checkpoint directory in it")
    p.add_argument("--cache", required=True, help="the feature cache to evaluate on")
    p.add_argument("--split", help="which split (default: val, or the videos the run held out of its train split "
                   "when the cache has none)")
    p.add_argument("--checkpoint", choices=["best", "last"], help="which checkpoint of RUN (default best)")
    p.add_argument("--out", help="where to write the files (default: RUN)")
    p.add_argument("--batch-size", type=int, help="videos per forward pass (default 16)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the GPU when there is one)")
    p.add_argument("--views", metavar="MODE",
                   help="full (default: one view over the whole video, the paper's mode) or TxS: T clips of the "
                   "training clip length evenly spaced in time (S = 1 from a cache), softmax averaged, e.g. 10x1")
    p.add_argument("--attention", type=int, metavar="N",
                   help="for the first N videos write attention/<id>.png (frame thumbnails from the source video "
                   "over [CLS]'s attention per layer and the rollout) and attention/attention.json")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(p, "views=10x1")
    p.set_defaults(func=_evaluate)


def _add_predict(sub) -> None:
    from vtn.config import add_config_args

    q = sub.add_parser(
        "predict", help="classify raw video files end to end with a trained run (backbone + encoder + head)",
        description="Decode INPUT (a video file, a folder of videos, or a CSV manifest) with stage one's worker "
        "pipeline, run the backbone the model's features came from (rebuilt and checked against the recorded "
        "weights sha256), sampled as its cache was, then the encoder and head; prints the top classes of each video. "
        "Exit status: 0 all videos predicted, 3 some failed (reported, the rest predicted), 2 usage error.")
    q.add_argument("input", help="a video file, a folder of videos, or a .csv manifest")
    q.add_argument("--model", required=True, metavar="RUN",
                   help="a `vtn train` or `vtn finetune` run directory, a checkpoint directory, or a `vtn export` folder")
    q.add_argument("--checkpoint", choices=["best", "last"], help="which checkpoint of RUN (default best)")
    q.add_argument("--views", metavar="MODE",
                   help="full (default: one view over the whole video) or TxS: T clips of the training clip length "
                   "evenly spaced in time x S crops (1 centre, or 3 along the long side), softmax averaged, e.g. 10x3")
    q.add_argument("--top", type=int, help="classes to print per video (default 5)")
    q.add_argument("--json", metavar="FILE", help="write one JSON object per video (JSON lines)")
    q.add_argument("--attention", type=int, metavar="N",
                   help="for the first N videos write a PNG of [CLS]'s attention over frame thumbnails, and "
                   "attention.json, into attention/ beside --json (or --attention-dir)")
    q.add_argument("--attention-dir", metavar="DIR", help="where attention/ goes (default: beside --json, or here)")
    q.add_argument("--weights", metavar="PATH", help="the backbone weights file, when it moved since extraction")
    q.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    q.add_argument("--batch-size", type=int, help="frames per backbone forward, across videos (default 64)")
    q.add_argument("--workers", type=int, help="decode processes (default: as vtn extract)")
    q.add_argument("--amp", choices=["none", "bf16", "fp16"], help="autocast precision (default none)")
    q.add_argument("--images", action="store_true",
                   help="classify still images (PNG, JPEG ...) as one-frame videos instead of refusing them")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(q, "views=10x3")
    q.set_defaults(func=_predict)


def _add_report(sub) -> None:
    r = sub.add_parser("report", help="training curves of a run (curves.png) and its best figures",
                       description="Draws RUN/curves.png (train loss, learning rate and val top-1 against steps) from "
                       "RUN/metrics.jsonl, for any run, finished or not, and prints its best epoch.")
    r.add_argument("run", help="a `vtn train` run directory")
    r.set_defaults(func=_report)


def _add_export(sub) -> None:
    e = sub.add_parser(
        "export", help="a trained run as a Hugging Face model folder, or its encoder + head as ONNX",
        description="--out DIR: a model folder in Hugging Face's layout (config.json, model.safetensors, a README.md "
        "model card) with inputs.json (the backbone's identity, the sampling), which `vtn predict --model DIR` takes; "
        "push it with huggingface_hub's upload_folder. --onnx FILE: the temporal encoder + head with its feature "
        "normalisation, dynamic in batch and frames (inputs features [batch, frames, D] float32, positions [batch, "
        "frames] int64; output logits [batch, classes]), for ONNX Runtime (pip install 'vtn[onnx]'). --torchscript FILE: "
        "the same encoder + head for torch.jit.load, with no vtn needed to run it.")
    e.add_argument("run", help="a `vtn train` or `vtn finetune` run directory, or a checkpoint directory")
    e.add_argument("--out", metavar="DIR", help="the model folder to write")
    e.add_argument("--with-backbone", action="store_true",
                   help="copy the backbone's weights into the folder when they are a file (a fine-tuned backbone, or "
                   "--weights at extraction); timm's own weights are rebuilt from the recorded identity")
    e.add_argument("--onnx", metavar="FILE", help="write the encoder + head as ONNX")
    e.add_argument("--torchscript", metavar="FILE", help="write the encoder + head as TorchScript")
    e.add_argument("--checkpoint", choices=["best", "last"], help="which checkpoint of RUN (default best)")
    e.set_defaults(func=_export)


def _export(args) -> int:
    from vtn.errors import UserError

    if not (args.out or args.onnx or args.torchscript):
        raise UserError("nothing to write: give --out DIR, --onnx FILE or --torchscript FILE")
    if args.with_backbone and not args.out:
        raise UserError("--with-backbone puts the backbone into the model folder: give --out DIR")
    from vtn.temporal import export
    from vtn.temporal.checkpoint import locate
    from vtn.temporal.e2e import load_temporal

    checkpoint = args.checkpoint or "best"
    if args.out:
        done = export.export_folder(args.run, args.out, checkpoint, args.with_backbone)
        print(f"vtn export: {done['checkpoint']} -> {args.out} ({', '.join(done['files'])}); backbone: {done['backbone']}")
    for path, write, kind in ((args.onnx, export.export_onnx, "ONNX"),
                              (args.torchscript, export.export_torchscript, "TorchScript")):
        if path:
            path = write(load_temporal(locate(args.run, checkpoint)), path)
            print(f"vtn export: encoder + head -> {path} ({kind}; inputs features, positions; output logits)")
    return 0


def _evaluate(args) -> int:
    import json

    from vtn.paths import check_run_dir

    if args.out:  # at the door, before torch loads (evaluate checks again: it is called from Python too)
        check_run_dir(args.out, "evaluation")
    from vtn.config import job_config
    from vtn.evaluate.run import evaluate
    from vtn.evaluate.settings import FLAGS, EvaluateConfig
    from vtn.temporal.metrics import summary_line

    m = evaluate(args.run, args.cache, out=args.out, settings=job_config(EvaluateConfig, args, FLAGS),
                 progress=not args.quiet)
    if args.json:
        print(json.dumps(m))
        return 0
    # Without a val split the run's held-out videos are scored: they come from the train split, but were never trained on
    scored = f"held out of {m['split']}" if m.get("held_out_of_train") else m["split"]
    if not m["videos"]:
        print(f"{scored}: no labelled videos; predictions written")
        return 0
    print(f"{scored}: {m['videos']} videos  {summary_line(m)}  ECE {m['calibration']['ece']:.3f}  ({m['views']['mode']}: {m['frames_through_backbone']} frames, "
          f"{m['seconds']:.2f} s)")
    print(f"  {'class':<24} precision  recall     f1  videos")
    for name, c in m["per_class"].items():
        print(f"  {name[:24]:<24} {c['precision']:9.3f} {c['recall']:7.3f} {c['f1']:6.3f} {c['videos']:7d}")
    if m["most_confused"]:
        print("  most confused: " + "; ".join(f"{p['true']} taken for {p['predicted']} ({p['videos']})"
                                              for p in m["most_confused"]))
    return 0


def _predict(args) -> int:
    import sys
    import time

    from vtn.config import job_config
    from vtn.evaluate.predict import predict_job
    from vtn.evaluate.settings import FLAGS, PredictConfig

    started = time.perf_counter()
    cfg = job_config(PredictConfig, args, FLAGS)
    results, failures = predict_job(args.input, args.model, cfg, args.weights, args.json, args.attention_dir,
                                    args.quiet, args.images)
    seconds = time.perf_counter() - started
    frames = sum(r["frames_through_backbone"] for r in results)
    print(f"vtn predict: {len(results)} videos in {seconds:.1f} s ({cfg.views}: {frames / max(len(results), 1):.0f} "
          f"frames through the backbone per video); {len(failures)} failed", file=sys.stderr)
    return 3 if failures else 0


def _report(args) -> int:
    import json
    from pathlib import Path

    from vtn.errors import UserError
    from vtn.paths import check_run_dir
    from vtn.plots import curves_png
    from vtn.temporal.metrics import rank

    path = check_run_dir(args.run, existing=True) / "metrics.jsonl"  # curves.png goes only into a vtn run
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    if not records:
        raise UserError(f"{path}: no epoch has finished yet")
    png = curves_png(records, Path(args.run) / "curves.png")
    best = max(records, key=rank)
    # The epochs trained, from the last record: a long run evaluates (and records) only every few epochs
    print(f"{args.run}: {records[-1]['epoch']} epochs, {records[-1]['step']} steps; best val top-1 {best['val_top1']:.1%} at "
          f"epoch {best['epoch']}; last {records[-1]['val_top1']:.1%}; curves: {png}")
    return 0
