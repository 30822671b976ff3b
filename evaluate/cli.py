"""`vtn evaluate`. Only argparse at module level, so `vtn --help` stays instant."""

from __future__ import annotations


def register(sub, bench_sub) -> None:
    """Add `vtn evaluate` to `vtn`."""
    p = sub.add_parser(
        "evaluate", help="accuracy of a trained run on a split of a cache (whole videos)",
        description="Load RUN's best checkpoint (or RUN itself, when it is a checkpoint directory), run one view over "
        "each whole video of the split (up to the model's max_positions), print top-1, top-5 and mean class "
        "accuracy, and write predictions.csv, confusion.csv and metrics.json into RUN (or --out).",
    )
    p.add_argument("run", help="a `vtn train` run directory, or a checkpoint directory in it")
    p.add_argument("--cache", required=True, help="the feature cache to evaluate on")
    p.add_argument("--split", help="which split (default: val, or the videos the run held out of its train split "
                   "when the cache has none)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint of RUN (default best)")
    p.add_argument("--out", help="where to write the files (default: RUN)")
    p.add_argument("--batch-size", type=int, default=16, help="videos per forward pass (default 16)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: the GPU when there is one)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    import json

    from vtn.evaluate.run import evaluate

    m = evaluate(args.run, args.cache, split=args.split, out=args.out, checkpoint=args.checkpoint,
                 batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(m))
    elif m["videos"]:
        print(f"{m['split']}: {m['videos']} videos  top-1 {m['top1']:.1%}  top-5 {m['top5']:.1%}  "
              f"mean class accuracy {m['mean_class_accuracy']:.1%}  loss {m['loss']:.4f}")
    else:
        print(f"{m['split']}: no labelled videos; predictions written")
    return 0
