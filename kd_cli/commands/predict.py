"""`kd predict run=RUN INPUT...`: put a trained model to work on image files.

RUN is a run directory, a model.safetensors or an exported model.onnx (run through onnxruntime; the
model.json that `kd export` embeds in it says how to feed it, and one beside it must agree). INPUT is an image, a folder
(searched recursively, sorted), or a text file listing one image path per line (relative to the
list). Each image gets the model's own preprocessing: its channels, its side (resize and centre crop
as in evaluation for models trained on image folders, a plain resize for the small in-memory data
sets), its mean and std. Images go through in batches, on the CPU or the GPU.

Writes a CSV (file, then class and probability for each of the top k) and prints the first rows. A
segmentation model writes a palette PNG mask per image instead (in OUT's folder + `_masks/`, at the
image's size) and a CSV of the share of pixels each class takes. A detector writes a CSV row per box found
(at or above `score_threshold`, in the image's own pixels), the same boxes in the COCO results format
(OUT's `.json` twin), and with `overlay=true` each image with its boxes drawn.
An unreadable image is named in one warning and left out (exit 0); `strict=true` stops instead,
before anything is written. An existing CSV is never overwritten unless `overwrite=true`.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from kd_cli.console import print_table
from kd_cli.errors import KdError, warn

if TYPE_CHECKING:
    from kd_cli.commands.inference import Predictor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
LIST_SUFFIXES = (".txt", ".lst")
DEFAULT_SCORE_THRESHOLD = 0.5  # a detector's boxes kept by kd predict unless score_threshold= says otherwise
SHOWN_ROWS = 10  # rows of the printed table (the CSV has all)
SKIPPED_SHOWN = 3
# The keys `kd predict` takes as key=value, Hydra style (also as --key VALUE).
KEYS = ("run", "top_k", "out", "batch_size", "device", "strict", "overwrite", "workers", "overlay", "score_threshold")

EPILOG = """\
examples:
  kd predict run=outputs/distill/2026-11-30/10-00-00-123456 photos/
  kd predict run=RUN cat.jpg dog.png top_k=3 out=two.csv
  kd predict run=RUN/export/model.onnx list.txt device=cpu
  kd predict run=RUN photos/ device=cuda batch_size=256 strict=true
  kd predict run=DETECTOR street/ score_threshold=0.3 overlay=true"""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through the CLI (exit 2), not argparse's usage block
        raise KdError(f"kd predict: {message} (see kd predict --help)")


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"'{text}' is not true or false")
    return lowered in ("true", "1", "yes")


def _positive(text: str, most: int = 2**16) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    if value > most:
        raise argparse.ArgumentTypeError(f"{value} must be at most {most}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1 (a detection's score)")
    return value


def build_parser() -> Parser:
    usage = (
        "kd predict run=RUN INPUT... [top_k=5] [out=predictions.csv] [batch_size=64] [device=cpu] "
        "[strict=false] [overwrite=false] [workers=N] [overlay=false] [score_threshold=0.5]   (or --key VALUE)"
    )
    parser = Parser(
        prog="kd predict",
        usage=usage,
        description=__doc__.split("\n\n", 1)[1].split("\n\n")[0],
        epilog=EPILOG,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="images, folders of images, or lists of paths")
    parser.add_argument("--run", required=True, help="run directory, model.safetensors or model.onnx")
    parser.add_argument("--top-k", "--top_k", dest="top_k", type=_positive, default=5, help="classes per image (5)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="the CSV (predictions.csv)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_positive, default=64)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu)")
    parser.add_argument("--strict", type=_bool, default=False, help="true: an unreadable image stops the command")
    parser.add_argument("--overwrite", type=_bool, default=False, help="true: replace an existing CSV")
    parser.add_argument(
        "--overlay",
        type=_bool,
        default=False,
        help="segmentation: also the image with its mask's colours over it; detection: with its boxes drawn",
    )
    parser.add_argument(
        "--score-threshold",
        "--score_threshold",
        dest="score_threshold",
        type=_probability,
        default=None,
        help="detection: the least score of a box kept (0.5)",
    )
    parser.add_argument(
        "--workers",
        type=lambda text: _positive(text, most=256),
        default=min(8, os.cpu_count() or 1),
        help="decoding threads",
    )
    return parser


def as_flags(argv: list[str]) -> list[str]:
    """`key=value` for the known keys -> `--key value`; every other word is left as it is."""
    out = []
    for word in argv:
        key, sep, value = word.partition("=")
        if sep and key in KEYS:
            out += [f"--{key}", value]
        elif sep and not word.startswith("-") and not os.path.exists(word) and "/" not in key:
            raise KdError(f"kd predict: unknown option '{key}' (known: {', '.join(KEYS)})")
        else:
            out.append(word)
    return out


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(as_flags(argv))
    if not args.inputs:
        raise KdError("kd predict: give at least one INPUT (an image, a folder or a list file) after run=RUN")
    files = collect_images(args.inputs)
    from kd_cli.engine.rundir import output_file

    # found now, not after every image is classified; the model and the images are never written over
    out = output_file(args.out, "out", args.overwrite, "overwrite=true", reads=[*files, Path(args.run)])
    # torch is imported only now: --help and a wrong argument are answered in a fraction of a second.
    from kd_cli.commands.inference import open_model, predict_files, preprocessing

    model = open_model(Path(args.run), args.device)
    from kd_cli.models import model_task

    task = model_task(model.spec.arch)
    if args.score_threshold is not None and task != "detection":
        raise KdError(f"kd predict: score_threshold= sets a detector's least box score; this model is a {task} model")
    if task == "detection":  # boxes per image (commands/predict_boxes.py)
        from kd_cli.commands.predict_boxes import predict_boxes
        from kd_cli.commands.predict_masks import masks_folder

        if out.suffix.lower() == ".json":
            raise KdError(f"kd predict: out={args.out} names the CSV; the COCO results go beside it as its .json twin")
        results = output_file(out.with_suffix(".json"), "out (its .json twin)", args.overwrite, "overwrite=true")
        drawn = masks_folder(out, args.overwrite, "boxes") if args.overlay else None
        args.score_threshold = DEFAULT_SCORE_THRESHOLD if args.score_threshold is None else args.score_threshold
        rows, skipped = predict_boxes(model, files, args, drawn)
    elif task == "segmentation":  # a mask per image (commands/predict_masks.py)
        from kd_cli.commands.predict_masks import masks_folder, predict_masks

        folder = masks_folder(out, args.overwrite)
        overlays = masks_folder(out, args.overwrite, "overlays") if args.overlay else None
        rows, skipped = predict_masks(model, files, preprocessing(model.spec), args, folder, overlays)
    else:
        if args.overlay:
            raise KdError(
                "kd predict: overlay=true draws a segmenter's masks or a detector's boxes; this model is a classifier"
            )
        rows, skipped = predict_files(model, files, preprocessing(model.spec), args)
    from kd_cli.data.on_disk import shown_path

    if skipped and args.strict:
        path, problem = skipped[0]
        raise KdError(
            f"cannot read image {shown_path(path)} ({problem}); {len(skipped)} unreadable in all (strict=true: "
            "nothing written); fix or remove them, or drop strict=true to skip them"
        )
    if skipped:
        shown = "; ".join(f"{shown_path(path)} ({problem})" for path, problem in skipped[:SKIPPED_SHOWN])
        more = f"; and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
        warn(f"skipped {len(skipped)} unreadable image(s) of {len(files)}: {shown}{more}")
    if not rows:
        raise KdError(f"none of the {len(files)} image(s) could be read; nothing written")
    if task == "detection":
        write_boxes(out, results, rows, model, args.score_threshold)
        return 0
    if task == "segmentation":
        write_shares(out, rows, model.spec.class_names)
        print_masks(rows, model, args.out)
        return 0
    write_csv(out, rows, min(args.top_k, model.spec.num_classes))
    print_predictions(rows, model, args.out)
    return 0


# ------------------------------------------------------------------------------------------------ inputs


def collect_images(inputs: list[str]) -> list[Path]:
    """Every image the inputs name, in order (folders sorted), each once."""
    found: list[Path] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():  # symlinks followed, loops not: as the image-folder data set reads a folder
            from kd_cli.data.on_disk import walk_without_loops

            files = (Path(folder, name) for folder, names in walk_without_loops(str(path)) for name in sorted(names))
            found += sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            found += _listed(path)
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise KdError(
                f"input {path} is not a regular file (a FIFO, a socket or a device); give images, folders or list files"
            )
        else:
            raise KdError(f"input {path} does not exist; give images, folders of images or list files")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise KdError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(inputs)}")
    return unique


def _listed(path: Path) -> list[Path]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise KdError(f"cannot read the list {path} ({error}); give one image path per line") from None
    return [(path.parent / line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


# ------------------------------------------------------------------------------------------------ output


def write_csv(path: Path, rows: list[dict], k: int) -> None:
    header = ["file"] + [f"{what}{i}" for i in range(1, k + 1) for what in ("class", "prob")]
    cells = []
    for row in rows:
        cells.append([row["file"]])
        for name, prob in zip(row["classes"], row["probs"]):
            cells[-1] += [name, f"{prob:.6f}"]
    _write_rows(path, header, cells)


def write_shares(path: Path, rows: list[dict], class_names: list[str]) -> None:
    """A segmenter's CSV: the file, its mask, and the % of the image's pixels each class takes."""
    header = ["file", "mask", *(f"{name} %" for name in class_names)]
    _write_rows(path, header, [[row["file"], row["mask"], *(f"{v:.3f}" for v in row["shares"])] for row in rows])


def _write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    text = buffer.getvalue()
    from kd_cli.engine.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    # surrogateescape: a file name that is not UTF-8 is written as its own bytes, so it names the file
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape"))


def print_predictions(rows: list[dict], model: Predictor, out: Path) -> None:
    from kd_cli.data.on_disk import shown_path

    cells = [
        [
            shown_path(row["file"]),
            row["classes"][0],
            f"{row['probs'][0]:.3f}",
            ", ".join(f"{name} {prob:.2f}" for name, prob in zip(row["classes"][1:3], row["probs"][1:3])),
        ]
        for row in rows[:SHOWN_ROWS]
    ]
    more = [f"... and {len(rows) - SHOWN_ROWS} more"] if len(rows) > SHOWN_ROWS else []
    print_table(
        f"kd predict: {len(rows)} image(s), {model.spec.arch} ({model.source})",
        [("file", "left"), ("top-1", "left"), ("p", "right"), ("next", "left")],
        cells,
        notes=[*more, f"predictions: {out}"],
    )


def write_boxes(out: Path, results: Path, rows: list[dict], model: Predictor, threshold: float) -> None:
    """A detector's CSV (a row per box) and COCO results file, then the first images' boxes printed."""
    from kd_cli.commands.predict_boxes import csv_rows, write_results
    from kd_cli.data.on_disk import shown_path

    names = model.spec.class_names
    _write_rows(out, *csv_rows(rows, names))
    write_results(results, rows, model.spec.extra.get("category_ids") or list(range(len(names))))
    cells = [
        [
            shown_path(row["file"]),
            str(len(row["detections"])),
            ", ".join(f"{names[d['label']]} {d['score']:.2f}" for d in row["detections"][:4])
            + (" ..." if len(row["detections"]) > 4 else ""),
        ]
        for row in rows[:SHOWN_ROWS]
    ]
    more = [f"... and {len(rows) - SHOWN_ROWS} more"] if len(rows) > SHOWN_ROWS else []
    total = sum(len(row["detections"]) for row in rows)
    print_table(
        f"kd predict: {len(rows)} image(s), {total} box(es) scoring >= {threshold:g}",
        [("file", "left"), ("boxes", "right"), ("best", "left")],
        cells,
        notes=[*more, f"model: {model.spec.arch} ({model.source})", f"boxes: {out}", f"COCO results: {results}"],
    )


def print_masks(rows: list[dict], model: Predictor, out: Path) -> None:
    from kd_cli.data.on_disk import shown_path

    names = model.spec.class_names

    def largest(shares: list[float]) -> str:  # the classes covering most of the image, background included
        top = sorted(range(len(shares)), key=lambda c: -shares[c])[:3]
        return ", ".join(f"{names[c]} {shares[c]:.1f}%" for c in top if shares[c] > 0)

    cells = [[shown_path(row["file"]), shown_path(row["mask"]), largest(row["shares"])] for row in rows[:SHOWN_ROWS]]
    more = [f"... and {len(rows) - SHOWN_ROWS} more"] if len(rows) > SHOWN_ROWS else []
    print_table(
        f"kd predict: {len(rows)} image(s) segmented, {model.spec.arch} ({model.source})",
        [("file", "left"), ("mask", "left"), ("largest classes", "left")],
        cells,
        notes=[*more, f"class shares: {out}"],
    )
