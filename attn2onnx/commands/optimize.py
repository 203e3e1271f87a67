"""Run the graph passes on an ONNX model for a target runtime.

  attn2onnx optimize model.onnx -o model.opt.onnx                    target ort (default)
  attn2onnx optimize model.onnx -o model.trt.onnx --target trt       tags nodes for TensorRT plugins
  attn2onnx optimize model.onnx -o model.opt.onnx --report           what each pass changed
  attn2onnx optimize model.onnx -o model.opt.onnx --json
  attn2onnx optimize model.onnx -o model.opt.onnx --explain         each attention core: fused, or why not
  attn2onnx optimize model.onnx -o model.opt.onnx --no-native-attention   MultiHeadAttention for stock ORT

Targets: ort (may use com.microsoft contrib ops), trt (standard ops + plugin nodes),
portable (standard ops + ai.attn2onnx nodes with their bodies). --json prints
{"nodes_before", "nodes_after", "fused": {op: count}, "other_changes": {what: count}, "macs_before",
"macs_after"}: "fused" holds fusions only; "other_changes" what passes did that is not a fusion
(trt's "tagged": nodes tagged to run as a TensorRT plugin, "function_body": custom nodes TensorRT
builds from their function body; "casts": integer inputs cast to int64; ...). With --explain
the same one object holds "explain": {"attention_cores", "fused", "cores": [{"core", "fused",
"reason", "op"}]}. A core that already is a fused attention op (ai.attn2onnx's DcmhaAttention,
PooledNormAttention, ...; com.microsoft's MultiHeadAttention) is listed as fused, naming the op."""

from __future__ import annotations

import argparse

HELP = "lower and fuse attention onto fast kernels (graph passes)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="IN.onnx")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    parser.add_argument("--target", choices=("ort", "trt", "portable"), default="ort")
    add_native_option(parser)
    parser.add_argument("--report", action="store_true", help="print per pass what changed")
    parser.add_argument("--json", action="store_true", help="print one JSON summary object")
    parser.add_argument(
        "--explain",
        action="store_true",
        help="list each attention core (softmax over q.k logits) and the fusion it got or why not",
    )


def add_native_option(parser: argparse.ArgumentParser) -> None:
    """``--no-native-attention`` (optimize, export --optimize): target ort without StandardAttention."""
    parser.add_argument(
        "--no-native-attention",
        dest="native_attention",
        action="store_false",
        help="target ort: keep com.microsoft MultiHeadAttention / GroupQueryAttention for stock ONNX Runtime "
        "instead of ai.attn2onnx StandardAttention where the latter measured faster",
    )


def summary(report) -> dict:
    """The ``--json`` object of a passes Report."""
    return {
        "nodes_before": report.before.nodes,
        "nodes_after": report.after.nodes,
        "fused": report.fusions(),
        "other_changes": report.other_changes(),
        "macs_before": report.before.macs,
        "macs_after": report.after.macs,
    }


def explanation(outcomes: list) -> dict:
    """The ``--json`` object of ``--explain``'s outcomes (passes.explain.Outcome)."""
    from dataclasses import asdict

    return {
        "attention_cores": len(outcomes),
        "fused": sum(o.fused for o in outcomes),
        "cores": [asdict(o) for o in outcomes],
    }


def run(args: argparse.Namespace) -> int:
    import json

    from ..file_kinds import require_onnx_name
    from ..fileio import check_destination, refuse_overwriting_inputs, regular_file

    regular_file(args.model)  # a missing model or output folder in one line, before onnx and the passes load
    require_onnx_name(args.output)  # as export: an ONNX model goes to a .onnx file
    check_destination(args.output)
    from ..onnx_io import load_onnx, model_files, output_files
    from ..passes import optimize
    from ..progress import Progress

    inputs = model_files(args.model, load_onnx(args.model))  # one-line error for a missing / non-ONNX file
    refuse_overwriting_inputs(output_files(args.output), inputs)  # (that proto is not kept: its weights)
    report = optimize(
        args.model,
        args.output,
        target=args.target,
        progress=Progress.for_command(json_output=args.json),
        native=args.native_attention,
    )
    outcomes = None
    if args.explain:
        import onnx_ir as ir

        from ..passes.explain import explain

        # with its weights (tril buffers)
        outcomes = explain(ir.load(args.model), target=args.target, native=args.native_attention)
    if args.json:  # stdout is one JSON document, the explanation inside it
        doc = summary(report)
        if outcomes is not None:
            doc["explain"] = explanation(outcomes)
        print(json.dumps(doc))
        return 0
    if args.report:
        print(report)
        print(f"wrote {args.output}")
    else:
        from ..passes.report import describe_counts

        fused = report.fusions()
        print(f"wrote {args.output}: {report.before.nodes} -> {report.after.nodes} nodes")
        print(f"  {describe_counts(fused) if fused else 'fused nothing'}")
        other = report.other_changes()
        if other:
            print(f"  also: {describe_counts(other)}")
    if outcomes is not None:
        print(f"attention cores: {len(outcomes)}, fused {sum(o.fused for o in outcomes)}")
        for outcome in outcomes:
            print(f"  {outcome}")
    return 0
