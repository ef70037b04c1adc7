"""CLI commands of the export stage: ``sparsify export``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .._io import check_new_file
from ..errors import UsageError, not_applicable
from ._common import app, err, handle_errors, out


def _render(report) -> Table:
    """The per-layer sparse/dense choice table."""
    t = Table(title=f"{report.out} · {report.sparse_layers}/{len(report.layers)} conv layers as SparseConv")
    for col, justify in (("layer", "left"), ("weight", "right"), ("density", "right"), ("written as", "left"),
                         ("why", "left")):
        t.add_column(col, justify=justify, overflow="fold")  # long layer names wrap rather than lose their ends
    for c in report.layers:
        op = (f"SparseConv{c.activation.replace('MaxPool', ' + MaxPool')}"
              + (f" (input in {c.pieces} pieces)" if c.pieces > 1 else ""))
        t.add_row(c.layer, "x".join(map(str, c.weight_shape)), f"{c.density:.3f}",
                  Text(op, style="bold cyan") if c.sparse else "Conv", c.reason)
    return t


def _print_compaction(comp: dict) -> None:
    removed = comp["channels_removed"]
    total = comp["channels_total"]
    out.print(f"compaction: removed {removed} of {total} channels, stored parameters (masked zeros included) "
              f"{comp['params_before']:,} -> {comp['params_after']:,} "
              f"(certificate: max error {comp['max_error']:.2g} at output scale {comp['output_scale']:.3g})",
              highlight=False)
    for r in comp["removed"]:
        out.print(f"  removed {r['channels']} channel(s) of {', '.join(r['layers']) or 'group ' + str(r['group'])}: "
                  f"{r['reason']}", highlight=False)
    for r in comp["kept"]:
        out.print(f"  kept {r['channels']} removable-looking channel(s) of "
                  f"{', '.join(r['layers']) or 'group ' + str(r['group'])}: {r['reason']}", highlight=False)


@app.command()
@handle_errors
def export(
    source: Path = typer.Argument(..., help="A run directory, or an .onnx file to convert"),
    out_text: str = typer.Option(..., "--out", "-o", metavar="<path>", help="The .onnx file to write"),
    dense: bool = typer.Option(False, "--dense", help="Every conv as a plain Conv with the masked weights (baseline)"),
    compact: Optional[bool] = typer.Option(
        None, "--compact/--no-compact",
        help="Remove dead channels first (exact). Default: on, except with --dense (the uncompacted baseline)"),
    fold_bn: Optional[bool] = typer.Option(None, "--fold-bn/--no-fold-bn",
                                           help="Fold eval BatchNorm into the previous conv (default: on)"),
    dense_threshold: Optional[float] = typer.Option(
        None, min=0.0, max=1.0,
        help="Convs at or above this density stay plain Conv, for every layer. Default: a per-layer rule from "
             "the kernel's measured crossovers by kernel, stride and plane size (benchmarks/bench_kernel.py)"),
    channel_align: Optional[int] = typer.Option(None, "--channel-align", min=1,
                                                help="Compaction keeps each channel group at a multiple of this many "
                                                     "channels (default 8: ORT's Conv is slower on unaligned counts); "
                                                     "1 removes every dead channel"),
    autotune: bool = typer.Option(False, "--autotune",
                                  help="Time dense vs SparseConv on the real shape of each layer the rule would "
                                       "consider (those it keeps dense for density or shape are not timed) and keep "
                                       "the faster"),
    per_image: Optional[bool] = typer.Option(
        None, "--per-image/--no-per-image",
        help="Run the network image by image (an ONNX Scan over the batch) so that a batch's activations stay in "
             "cache. Default: only the front, up to the last SparseConv whose output reaches 512 KiB per image "
             "(224x224 models at batch 8: 1.1-1.45x faster; at batch 1 the extra subgraph run costs 1-9%, so "
             "--no-per-image for batch-1 deployments); --per-image: the whole network"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare with PyTorch in ONNX Runtime"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file"),
    as_json: bool = typer.Option(False, "--json", help="Print the export report as JSON"),
) -> None:
    """Export a run to ONNX with ai.sparsify::SparseConv nodes (or convert an existing .onnx file)."""
    from ..runtime.export import CHANNEL_ALIGN, check_output_path, export_onnx_file, export_run

    out_path = Path(out_text)
    check_output_path(out_text)  # the text: its trailing slash says a directory
    if out_path.is_dir():
        raise UsageError(f"--out {out_path} is a directory; give a file name such as {out_path / 'model.onnx'}")
    check_new_file(out_path, "--out", force)
    with err.status(f"exporting {escape(str(source))} ...") as status:
        def progress(stage: str) -> None:
            status.update(f"exporting {escape(str(source))}: {escape(stage)} ...")

        if dense and autotune:  # --autotune was ignored: every conv is written plain
            raise UsageError("--autotune times SparseConv against Conv per layer and --dense writes every conv as a "
                             "plain Conv; give one of them")
        if source.suffix == ".onnx" and not source.is_dir():
            given = [f for f, v in (("--dense", dense), ("--compact", compact), ("--fold-bn", fold_bn is True),
                                    ("--no-fold-bn", fold_bn is False), ("--channel-align", channel_align)) if v]
            if given:  # --no-fold-bn and --channel-align were taken and ignored
                raise not_applicable(given, "run directories", "an .onnx file is only converted")
            report = export_onnx_file(source, out_path, dense_threshold=dense_threshold, verify=verify,
                                      autotune=autotune, per_image=per_image)
        else:
            report = export_run(source, out_path, dense=dense, compact=(not dense) if compact is None else compact,
                                fold_bn=fold_bn is not False, dense_threshold=dense_threshold, verify=verify,
                                autotune=autotune, per_image=per_image, progress=progress,
                                channel_align=CHANNEL_ALIGN if channel_align is None else channel_align)
    if as_json:
        out.print_json(json.dumps(report.to_json(), default=str))
        return
    if report.compaction:
        _print_compaction(report.compaction)
    if report.folded_bn:
        out.print(f"folded {len(report.folded_bn)} BatchNorm layer(s) into their convs", highlight=False)
    out.print(_render(report))
    if report.per_image_nodes or per_image is not None:
        out.print(f"per image: {report.per_image}", highlight=False)
    reference = "the source model" if str(report.source).endswith(".onnx") else "PyTorch"
    for label, e in report.errors.items():
        out.print(f"verified ({label}): max abs error {e:.2g} vs {reference}", highlight=False)
    if not report.errors:
        out.print("[yellow]not verified[/] (--no-verify)", markup=True)
    elif "native" not in report.errors:
        out.print("native kernel not built: verified through the function body only", highlight=False)
    for note in report.notes:
        err.print(f"note: {note}", highlight=False)
    if out_path.suffix.lower() != ".onnx":
        err.print(f"note: {out_path} does not end in .onnx; it holds an ONNX model, but `sparsify export` "
                  "(to convert it again) and most ONNX tools go by that suffix: consider renaming it", highlight=False)
    out.print(f"[green]wrote[/] {escape(str(report.out))} ({report.file_bytes:,} bytes)", markup=True)
