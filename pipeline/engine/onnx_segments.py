"""Tensor parallelism of exported engines: each tp rank's graph cut into segments at its collective markers.

The export records every TP collective of the runtime (the all-reduce after each row-parallel projection, the
all-gather of vocabulary-parallel logits or column-sharded embeddings) as a `trtllm_pipeline::AllReduce` /
`AllGather` node (onnx_export.CollectiveMarkers). Neither onnxruntime nor a TensorRT engine can run such a node, so
the graph is cut there: segment k holds the nodes between marker k-1 and marker k (graph order is topological, so
every segment only reads graph inputs, its own results, and results of earlier segments or markers). The runtime
runs segment k, performs collective k over the tp group (torch.distributed, as the cpu runtime does), and feeds the
result to the segments that read it.

Why segments rather than TensorRT's in-engine collective (IDistCollectiveLayer): one set of files serves both the
onnx and the tensorrt backend and is verifiable on a CPU (onnxruntime runs the segments; the all-reduce is the cpu
runtime's own); it needs no NCCL communicator plumbing from Python, no TensorRT >= 10.16 preview feature and no
SM80+ GPU. The price is 2 x layers + 1 engine launches per token per rank instead of one (see docs/BACKENDS.md).

A tensor that several segments read crosses as an output of the segment that makes it and an input of each reader;
integer tensors computed from shapes alone (reshape targets the optimizer shared between layers) are recomputed in
each reader instead, so that no segment takes a shape tensor as an input (TensorRT wants those on the host).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

COLLECTIVE_DOMAIN = "trtllm_pipeline"
COLLECTIVES = {"AllReduce": "all_reduce", "AllGather": "all_gather"}
RECOMPUTE_MAX_BYTES = 4096
EXTERNAL_DATA_BYTES = 1 << 30  # segments above this keep their weights beside the graph (protobuf's 2 GB limit)
SHAPE_OPS = {"Constant", "Shape", "Gather", "Concat", "Unsqueeze", "Squeeze", "Slice", "Cast", "Add", "Sub", "Mul",
             "Div", "Reshape", "Identity"}  # constants a recomputed shape chain may copy into each segment that reads it


def split_at_collectives(path: Path) -> list[dict[str, Any]] | None:
    """Cut the ONNX graph at `path` at its collective markers, writing `{stem}.seg{k}.onnx` beside it and removing
    the uncut file. Returns the plan the runtime follows: segments and collectives in order, each segment with its
    input and output names, shapes and dtypes; None when the graph holds no marker (it stays one file)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    graph = model.graph
    markers = [i for i, n in enumerate(graph.node) if n.domain == COLLECTIVE_DOMAIN]
    if not markers:
        return None
    for i in markers:
        if graph.node[i].op_type not in COLLECTIVES:
            raise PipelineError(f"{path.name}: unknown collective marker {graph.node[i].op_type}")
    producer = {out: n for n in graph.node for out in n.output}
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {v.name: v for v in graph.input}
    info = {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}
    graph_outputs = {v.name for v in graph.output}

    bounds = [-1, *markers, len(graph.node)]
    groups = [list(graph.node[bounds[k] + 1: bounds[k + 1]]) for k in range(len(bounds) - 1)]
    made_in = {out: k for k, nodes in enumerate(groups) for n in nodes for out in n.output}
    position = {id(n): i for i, n in enumerate(graph.node)}
    groups = [_recompute_shape_chains(nodes, k, made_in, producer, inits, graph_inputs, info, position)
              for k, nodes in enumerate(groups)]
    made = [{out for n in nodes for out in n.output} for nodes in groups]
    needs = [list(dict.fromkeys(name for n in nodes for name in n.input
                                if name and name not in made[k] and name not in inits))
             for k, nodes in enumerate(groups)]
    marker_inputs = [graph.node[i].input[0] for i in markers]

    plan = []
    opset = [o for o in model.opset_import if o.domain != COLLECTIVE_DOMAIN]
    for k, nodes in enumerate(groups):
        read_later = {name for later in needs[k + 1:] for name in later} | set(marker_inputs[k:])
        outputs = [name for name in dict.fromkeys(out for n in nodes for out in n.output)
                   if name in graph_outputs or name in read_later]
        used_inits = [inits[name] for name in dict.fromkeys(i for n in nodes for i in n.input) if name in inits]
        for name in needs[k] + outputs:
            if name not in info:
                raise PipelineError(f"{path.name}: the exporter recorded no type for {name}, a segment boundary")
        seg = helper.make_graph(nodes, f"{graph.name}_seg{k}", [info[name] for name in needs[k]],
                                [info[name] for name in outputs], initializer=used_inits,
                                value_info=[v for v in graph.value_info if v.name in made[k] and v.name not in outputs])
        seg_model = helper.make_model(seg, opset_imports=opset, ir_version=model.ir_version,
                                      producer_name=model.producer_name)
        file = f"{path.name.removesuffix('.onnx')}.seg{k}.onnx"
        weight_bytes = sum(len(t.raw_data) for t in used_inits)
        onnx.save(seg_model, str(path.parent / file), save_as_external_data=weight_bytes > EXTERNAL_DATA_BYTES,
                  location=f"{file}.data")
        onnx.checker.check_model(str(path.parent / file), full_check=True)
        plan.append({"segment": file, "inputs": [_describe(info[n]) for n in needs[k]],
                     "outputs": [_describe(info[n]) for n in outputs]})
        if k < len(markers):
            m = graph.node[markers[k]]
            attrs = {a.name: helper.get_attribute_value(a) for a in m.attribute}
            plan.append({"collective": COLLECTIVES[m.op_type], "input": m.input[0], "output": m.output[0],
                         **({"axis": int(attrs["axis"])} if "axis" in attrs else {})})
    _remove_with_external_data(path)
    return plan


def _remove_with_external_data(path: Path) -> None:
    """Remove an ONNX file and the external-data files its initializers point to (models over EXTERNAL_DATA_BYTES
    keep their weights beside the graph), so the uncut model's weights do not stay in the engine."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    locations = {entry.value for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    path.unlink()
    for location in locations:
        (path.parent / location).unlink(missing_ok=True)


def _recompute_shape_chains(nodes: list, k: int, made_in: dict[str, int], producer: dict, inits: dict,
                            graph_inputs: dict, info: dict, position: dict) -> list:
    """Segment k's nodes, preceded by copies of the chains making the shape tensors it reads from earlier
    segments (static-length integer tensors computed from the graph inputs' shapes and small constants)."""
    made = {out for n in nodes for out in n.output}
    extra: dict[int, Any] = {}

    def chain(name: str) -> list | None:
        if name in made or name in graph_inputs:
            return []
        if name in inits:
            return [] if inits[name].ByteSize() <= RECOMPUTE_MAX_BYTES else None
        node = producer.get(name)
        if node is None or node.op_type not in SHAPE_OPS or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Shape":
            return [node] if node.input[0] in graph_inputs else None
        found = [node]
        for i in node.input:
            if i:
                sub = chain(i)
                if sub is None:
                    return None
                found += sub
        return found

    for n in nodes:
        for name in n.input:
            if name and name not in made and made_in.get(name, k) < k and _is_shape_tensor(info.get(name)):
                for node in chain(name) or []:
                    extra[id(node)] = node
    return sorted(extra.values(), key=lambda n: position[id(n)]) + nodes


def _is_shape_tensor(value) -> bool:
    """A static-length integer tensor (a shape or index list), as opposed to data with dynamic dimensions."""
    if value is None:
        return False
    t = value.type.tensor_type
    return t.elem_type in (6, 7) and all(d.HasField("dim_value") for d in t.shape.dim)  # INT32, INT64


def _describe(value) -> dict[str, Any]:
    from onnx import helper

    t = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
    return {"name": value.name, "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}
