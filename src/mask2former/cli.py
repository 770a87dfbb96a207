"""mask2former command line: train, evaluate, predict, export, serve, data export.

Every command takes --config (a preset name or YAML file) and key=value overrides. Errors are one line on
stderr with a non-zero exit code (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import TASKS

DEFAULT_PRESET = "fashion_scenes_lite0"
CHECKPOINT_HELP = ("checkpoint folder (ours, transformers), detectron2 .pkl, Hugging Face Hub id (org/name[@revision]) "
                   "or model-zoo name (e.g. coco_panoptic_r50)")


def _add_config_args(parser: argparse.ArgumentParser, default: str | None = DEFAULT_PRESET) -> None:
    parser.add_argument("--config", default=default, help=f"preset name or YAML file (default: {default})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. solver.max_iter=100")


ONNX_HELP = ("a model written by 'mask2former export' (.onnx, or OpenVINO IR .xml; its .yaml beside it), run on "
             "--runtime")
RUNTIME_HELP = ("runtime for --onnx: onnxruntime (default for .onnx) or openvino (default for .xml); --precision "
                "fp32/bf16 applies on openvino, onnxruntime runs the file's own precision (fp32 or int8)")


def _add_runtime_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime", default=None, choices=["onnxruntime", "openvino"], help=RUNTIME_HELP)


def _load_exported(args, threads: int | None = None):
    """The --onnx model on --runtime at --precision, and one line saying which precision runs."""
    from .inference.runtimes import load_exported

    model = load_exported(args.onnx, args.runtime, args.precision, threads=threads)
    print(f"running {model.describe()}", file=sys.stderr)
    return model


def _presets() -> list[str]:
    from .config import PRESET_DIR

    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml") if not path.stem.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mask2former", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (default: the CPU FashionScenes preset)",
                                epilog="presets (src/mask2former/configs/): " + ", ".join(_presets()))
    _add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir")

    evaluate = commands.add_parser("evaluate", help="PQ / AP / mIoU of a checkpoint (or of saved results files) "
                                                    "on a data set")
    what = evaluate.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    what.add_argument("--onnx", help=ONNX_HELP)
    what.add_argument("--predictions", metavar="DIR", help="score standard results files (panoptic.json + panoptic/, "
                                                           "instances.json, semantic/) without a model")
    _add_config_args(evaluate)
    evaluate.add_argument("--tasks", default="panoptic,instance,semantic", help="comma-separated tasks to evaluate")
    evaluate.add_argument("--out", default=None, help="write the metrics as JSON here")
    evaluate.add_argument("--save-predictions", metavar="DIR", default=None,
                          help="also write the standard results files (COCO panoptic / COCO results / label PNGs)")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                          help="test-time precision (default fp32, as predict; not the training precision)")
    _add_runtime_args(evaluate)

    predict = commands.add_parser("predict", help="segment images, folders or glob patterns and write the results "
                                                  "files + overlays")
    predict.add_argument("images", nargs="+", help="image files, folders and glob patterns (quote them: 'dir/*.jpg', "
                                                   "'dir/**/*.png')")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    source.add_argument("--onnx", help=ONNX_HELP)
    predict.add_argument("--task", default="panoptic", choices=TASKS)
    predict.add_argument("--out", default="predictions", help="output directory")
    predict.add_argument("--device", default="cpu")
    predict.add_argument("--min-size", type=int, default=None, help="resize the shortest edge to this (default: keep)")
    predict.add_argument("--max-size", type=int, default=None)
    predict.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                         help="test-time precision (default fp32, as evaluate)")
    _add_runtime_args(predict)
    predict.add_argument("--coco-json", default=None, help="take image ids from this COCO JSON's images "
                                                          "(matched by file name; default: the file stem)")
    predict.add_argument("--recursive", action="store_true", help="also take the images in subfolders of a folder")
    predict.add_argument("--batch-size", type=int, default=4, help="images of the same padded size per forward")
    predict.add_argument("--workers", type=int, default=None, help="threads decoding images and writing outputs "
                                                                   "(default: up to 4)")
    predict.add_argument("--no-overlays", dest="overlays", action="store_false",
                         help="write only the results files, no overlay pictures")
    predict.add_argument("--overlay-format", default="png", choices=["png", "jpg"],
                         help="overlay pictures as PNG (default) or JPEG (quality 90, several times cheaper to encode)")
    predict.add_argument("--overwrite", action="store_true",
                         help="predict every image again (default: skip images whose outputs exist)")
    predict.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="progress bar on stderr (default: when stderr is a terminal)")
    predict.add_argument("--shard", metavar="I/N", default=None,
                         help="predict only part I (from 0) of N of the inputs, without a process group (job arrays); "
                              "join the parts with `mask2former predict-merge OUT`. Under torchrun the parts are "
                              "the ranks and are merged automatically")

    merge = commands.add_parser("predict-merge", help="join the parts of `predict --shard I/N` runs into one set of "
                                                      "results files")
    merge.add_argument("dirs", nargs="+", metavar="DIR", help="the parts' output folder(s)")
    merge.add_argument("--out", default=None, help="where the merged results go (default: the first DIR; PNGs of "
                                                   "other folders are copied there)")
    merge.add_argument("--task", default=None, choices=TASKS, help="which task's parts (default: the only one)")

    export = commands.add_parser("export", help="export the inference graph (no post-processing)")
    export.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    export.add_argument("--format", default="onnx", choices=["onnx", "openvino"],
                        help="onnx (one .onnx file) or openvino (IR: .xml + .bin)")
    export.add_argument("--out", default=None, help="output file (default: model.onnx, or model.xml for openvino)")
    export.add_argument("--height", type=int, default=256, help="trace height (the file takes any size)")
    export.add_argument("--width", type=int, default=256, help="trace width (the file takes any size)")
    export.add_argument("--quantize", default=None, choices=["int8"],
                        help="also write an int8 model: <stem>.int8.onnx (onnxruntime dynamic int8) or, with --format "
                             "openvino, <stem>.int8.xml (NNCF post-training quantisation, calibrated on images)")
    export.add_argument("--runtime", default=None, choices=["onnxruntime", "openvino"],
                        help="check the exported file against PyTorch on this runtime (default: onnxruntime for "
                             "--format onnx, openvino for --format openvino)")
    export.add_argument("--calibration-images", type=int, default=None,
                        help="images for NNCF int8 calibration (--format openvino --quantize int8; default 300)")
    export.add_argument("--calibration-dir", default=None,
                        help="calibrate on the images of this folder (default: FashionScenes train images; use "
                             "training images of your own data for your model)")

    serve = commands.add_parser("serve", help="local web demo + JSON API")
    served = serve.add_mutually_exclusive_group(required=True)
    served.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    served.add_argument("--onnx", help=ONNX_HELP)
    _add_runtime_args(serve)
    serve.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="test-time precision")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--max-batch-size", type=int, default=4, help="requests arriving together share one forward")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    serve.add_argument("--threads", type=int, default=None,
                       help="torch threads for the forward pass (default: torch's, the cores)")

    data = commands.add_parser("data", help="data set tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    data_export = data_commands.add_parser("export", help="write a built-in data set in a real format")
    data_export.add_argument("dataset", choices=["fashion-scenes"])
    data_export.add_argument("out", help="output directory")
    data_export.add_argument("--format", default="coco-panoptic", choices=["coco-panoptic", "coco-instance", "semantic-png",
                                                                        "labelme", "yolo"])
    data_export.add_argument("--split", default="val", choices=["train", "val", "test"])
    data_export.add_argument("--num-images", type=int, default=100)
    data_export.add_argument("--seed", type=int, default=0)
    return parser


def _load_config(args):
    from .config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from .apps.train import run_train

    # model.* keys given on the command line win over a model.weights checkpoint's architecture
    explicit = [o.split("=", 1)[0].strip() for o in args.overrides if o.strip().startswith("model.")]
    run_train(_load_config(args), resume=args.resume, explicit_model_keys=explicit)
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation.evaluator import evaluate_checkpoint

    from .evaluation.evaluator import evaluate_predictions

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.predictions:
        if args.save_predictions:
            raise ValueError("--save-predictions needs --checkpoint (the predictions are already files)")
        metrics = evaluate_predictions(args.predictions, _load_config(args), tasks=tasks, out=args.out)
        print(f"scored the results files in {args.predictions} ({', '.join(metrics['details'])})")
    else:
        model = _load_exported(args) if args.onnx else args.checkpoint
        metrics = evaluate_checkpoint(model, _load_config(args), tasks=tasks, device=args.device,
                                      out=args.out, precision=args.precision, save_predictions=args.save_predictions)
        if _rank() != 0:
            return 0  # torchrun: rank 0 prints (every process has the same metrics)
        precision = f"{model.precision} on {model.runtime}" if args.onnx else args.precision
        print(f"precision: {precision}" + (f"; {_world_size()} processes" if _world_size() > 1 else ""))
    print(metrics["table"])
    if args.out:
        print(f"metrics written to {args.out}")
    if args.save_predictions:
        print(f"results files written to {args.save_predictions}")
    return 0


def cmd_predict(args) -> int:
    from .apps.predict_files import predict_files

    options = dict(
        checkpoint=args.checkpoint, onnx=args.onnx, runtime=args.runtime, task=args.task, out_dir=args.out, device=args.device,
        min_size=args.min_size, max_size=args.max_size, precision=args.precision, coco_json=args.coco_json,
        recursive=args.recursive, batch_size=args.batch_size, workers=args.workers, overlays=args.overlays,
        overwrite=args.overwrite, progress=args.progress, overlay_format=args.overlay_format,
    )
    if args.shard is not None or _world_size() > 1:
        return _predict_in_parts(args, options)
    report = predict_files(args.images, **options)
    print(f"predicted {report.predicted} images in {report.seconds:.1f} s ({report.images_per_second:.2f} images/s, "
          f"precision {report.precision}), {report.resumed} already done; results in {args.out} "
          f"({', '.join(p.name for p in report.files)})")
    return _report_errors(report.errors)


def _report_errors(errors) -> int:
    if errors:
        print(f"mask2former predict: error: {len(errors)} input(s) failed and were skipped:", file=sys.stderr)
        for name, message in errors:
            print(f"  {name}: {message}", file=sys.stderr)
        return 1
    return 0


def _world_size() -> int:
    """torchrun's process count (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _predict_in_parts(args, options) -> int:
    from .apps.predict_shards import parse_shard, predict_distributed, predict_shard

    if args.shard is not None:
        if _world_size() > 1:
            raise ValueError("--shard is for independent processes; under torchrun the ranks are the parts")
        shard = parse_shard(args.shard)
        report = predict_shard(args.images, shard, **options)
        print(f"part {shard[0]}/{shard[1]}: predicted {report.predicted} of its {len(report.shard_files)} images in "
              f"{report.seconds:.1f} s, {report.resumed} already done; when all parts are done: "
              f"mask2former predict-merge {args.out}")
        return _report_errors(report.errors)
    report, merged = predict_distributed(args.images, **options)
    if _rank() == 0:
        print(f"precision: {report.precision}; {merged['parts']} processes predicted {merged['images']} images (rank 0: "
              f"{report.predicted} in {report.seconds:.1f} s, {report.resumed} already done); results in {args.out} "
              f"({', '.join(p.name for p in merged['files'])})")
        return _report_errors(merged["errors"])
    return 1 if merged["errors"] else 0


def cmd_predict_merge(args) -> int:
    from .apps.predict_shards import merge_predictions

    merged = merge_predictions(args.dirs, out=args.out, task=args.task)
    print(f"merged {merged['parts']} parts: {merged['images']} images; results in {merged['out_dir']} "
          f"({', '.join(p.name for p in merged['files'])})")
    return _report_errors(merged["errors"])


def cmd_export(args) -> int:
    calibrating = args.format == "openvino" and args.quantize == "int8"
    if not calibrating and (args.calibration_images is not None or args.calibration_dir is not None):
        raise ValueError("--calibration-images/--calibration-dir apply to --format openvino --quantize int8 only "
                         "(onnxruntime's int8 is dynamic: it needs no calibration)")
    if args.format == "openvino":
        from .apps.openvino_export import export_openvino

        if args.runtime not in (None, "openvino"):
            raise ValueError("--format openvino writes OpenVINO IR, which only --runtime openvino runs")
        report = export_openvino(args.checkpoint, args.out or "model.xml", height=args.height, width=args.width,
                                 quantize=args.quantize, calibration_count=args.calibration_images or 300,
                                 calibration_dir=args.calibration_dir)
    else:
        from .apps.onnx import export_onnx

        report = export_onnx(args.checkpoint, args.out or "model.onnx", height=args.height, width=args.width,
                             quantize=args.quantize, runtime=args.runtime or "onnxruntime")
    print(json.dumps(report, indent=2))
    return 0


def cmd_serve(args) -> int:
    from .serve.app import serve

    model = _load_exported(args, threads=args.threads) if args.onnx else args.checkpoint
    serve(model, host=args.host, port=args.port, device=args.device, max_batch_size=args.max_batch_size,
          batch_wait_ms=args.batch_wait_ms, threads=args.threads, precision=args.precision)
    return 0


def cmd_data(args) -> int:
    from .data.export import export_fashion_scenes

    export_fashion_scenes(args.out, format=args.format, split=args.split, num_images=args.num_images, seed=args.seed)
    print(f"wrote {args.num_images} {args.split} images of FashionScenes as {args.format} to {args.out}")
    return 0


COMMANDS = {
    "train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "predict-merge": cmd_predict_merge, "export": cmd_export, "serve": cmd_serve,
    "data": cmd_data,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .allocator import tune_malloc

    tune_malloc()
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI turns every failure into one line
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"mask2former {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
