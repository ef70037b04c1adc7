"""CLI: `sparsify runtime ...` (native kernel status)."""
from __future__ import annotations

import json

import typer

from ..errors import RuntimeBackendError
from ._common import SparsifyTyper, app, handle_errors, out

runtime_app = SparsifyTyper(help="The ONNX Runtime backend: native SparseConv kernel status.", no_args_is_help=True)
app.add_typer(runtime_app, name="runtime")


@runtime_app.command("info")
@handle_errors
def info_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
    require: bool = typer.Option(False, "--require", help="Exit with code 2 when the native kernel is not loadable."),
) -> None:
    """Show whether the native SparseConv kernel is built and loadable, its path, ORT and API versions."""
    from ..runtime import native

    status = native.info()
    if as_json:
        out.print_json(json.dumps(status))
    else:
        out.print(f"onnxruntime   {status['onnxruntime_version']}", highlight=False)
        out.print(f"library       {status['library'] or '-'}", highlight=False)
        out.print(f"loadable      {'yes' if status['loadable'] else 'no'}", highlight=False)
        out.print(f"api_version   {status['api_version'] or '-'}", highlight=False)
        out.print(f"isa           {status['isa'] or '-'}", highlight=False)
        out.print(f"ops           {', '.join(status['ops']) or '-'}", highlight=False)
        if status["reason"]:
            out.print(f"reason        {status['reason']}", highlight=False)
    if require and not status["loadable"]:
        raise RuntimeBackendError(f"the native SparseConv kernel is not loadable: {status['reason']}")
