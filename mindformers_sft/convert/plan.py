"""Grouped, streaming conversion between Hugging Face and MindFormers tensor sets.

A :class:`Layout` describes one model (family + config) as a list of :class:`Rule` s. A rule ties a group of
Hugging Face tensors to a group of MindFormers tensors and says how to turn one into the other:

- a rename (Llama family, norms, embeddings): one tensor each side, values copied bit for bit;
- a concatenation (Qwen3 ``q/k/v_proj`` -> ``linear_qkv``, ``gate/up_proj`` -> ``linear_fc1``) and its split;
- a stack (the E experts of one MoE layer -> ``experts.weight1`` / ``weight2``) and its unstack.

:func:`plan` checks every input tensor against the layout before anything is written (its name must be
one of the model's, its shape the one the config implies, nothing may be missing; errors name the file
and the tensor) and returns the groups in the order they will complete. :func:`stream` then reads the
input once, file by file in file order, hands each tensor to its group's :class:`Assembler`, and yields
the group's outputs as soon as its last input is in, before the next input is read. A MoE layer's experts
are placed into the preallocated stacked weights one expert at a time (and unstacked one expert at a
time), so peak memory is about one group (a layer's q/k/v, one MoE layer's experts) whatever the model
size; for files written group by group (Hugging Face shards, our own output) nothing else is pending.
Measured in tests/convert/test_convert_memory.py: a 161 MiB Qwen3-MoE converts with ~20 MiB over the
import baseline (one MoE layer is 12.6 MiB).
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..checkpoint.dtypes import cast, is_float
from ..checkpoint import TensorInfo, iter_file
from ..errors import CheckpointError

Arrays = Sequence[np.ndarray]
Convert = Callable[[Arrays], Iterable[np.ndarray]]


class Assembler:
    """Builds a group's outputs while its inputs arrive: :meth:`put` takes input `j` (and may drop it at once),
    :meth:`outputs` gives the outputs (a list or a generator) once every input is in. This default keeps the
    inputs and applies `fn` (list -> outputs) at the end; a rule's own assembler can place each input into
    preallocated outputs instead (the experts of a MoE layer: no second copy of the layer)."""

    def __init__(self, n: int, fn: Optional[Convert] = None):
        self.slots: List[Optional[np.ndarray]] = [None] * n
        self.left, self.fn = n, fn

    def put(self, j: int, arr: np.ndarray):
        self.slots[j] = arr
        self.left -= 1

    def outputs(self) -> Iterable[np.ndarray]:
        slots, self.slots = self.slots, []
        return slots if self.fn is None else self.fn(slots)


@dataclass(frozen=True)
class Rule:
    """HF tensors `hf` <-> MindFormers tensors `mf`. `to_mf(hf arrays) -> mf arrays` and
    `to_hf(mf arrays) -> hf arrays` (lists or generators, in name order); None means one tensor each side,
    copied as is. `assemble_mf` (optional) makes an :class:`Assembler` that builds the MindFormers tensors
    input by input instead of `to_mf`."""
    hf: Tuple[str, ...]
    mf: Tuple[str, ...]
    to_mf: Optional[Convert] = None
    to_hf: Optional[Convert] = None
    assemble_mf: Optional[Callable[[], Assembler]] = None


def rename(hf: str, mf: str) -> Rule:
    return Rule((hf,), (mf,))


@dataclass
class Layout:
    """Every tensor of one model on both sides, with shapes, and the rules between them.

    `check_hf_name` / `check_mf_name` raise CheckpointError for a name that is not a weight name of the
    family at all (before "not a weight of this model" is said for a well-formed name of, e.g., a layer
    the config does not have). `tied_head` holds the (HF, MF) names of an output head that a tied config
    drops when an input carries it. `facts` summarises the config for messages.
    """
    rules: List[Rule]
    hf_shapes: "OrderedDict[str, Tuple[int, ...]]"
    mf_shapes: "OrderedDict[str, Tuple[int, ...]]"
    check_hf_name: Callable[[str, str], object]
    check_mf_name: Callable[[str, str], object]
    facts: str
    tied_head: Tuple[str, ...] = ()
    family: str = ""

    def side(self, to_mf: bool):
        """(source names -> shapes, target shapes, name checker) of a direction."""
        if to_mf:
            return self.hf_shapes, self.mf_shapes, self.check_hf_name
        return self.mf_shapes, self.hf_shapes, self.check_mf_name


@dataclass
class Group:
    srcs: List[TensorInfo]                       # inputs, in the rule's order
    outs: List[Tuple[str, Tuple[int, ...]]]      # (output name, shape), in the rule's order
    make: Callable[[], Assembler]


@dataclass
class Plan:
    groups: List[Group]      # in the order they complete when `files` are read in order
    files: List[str]         # input files in reading order

    @property
    def count(self) -> int:
        """Number of output tensors."""
        return sum(len(g.outs) for g in self.groups)


def plan(infos: "OrderedDict[str, TensorInfo]", layout: Layout, to_mf: bool, input_path: str, source: str,
         ignored: Callable[[str], bool]) -> Plan:
    """Check every tensor of `infos` (file order) against `layout`; the groups to convert, in the order they
    complete when the input is read in that order. `source` names the config (for messages)."""
    src_shapes, _, check_name = layout.side(to_mf)
    rule_of: Dict[str, Tuple[int, int]] = {}
    for ri, r in enumerate(layout.rules):
        for j, n in enumerate(r.hf if to_mf else r.mf):
            rule_of[n] = (ri, j)
    got: Dict[int, List[Optional[TensorInfo]]] = {}
    seen: Dict[str, str] = {}
    order: List[int] = []
    for name, info in infos.items():
        if ignored(name):
            continue
        if name not in rule_of:
            check_name(name, info.file)                # raises for names that are no weight of the family
            if name in layout.tied_head:
                continue   # tied: the head is the embedding (HF ignores a stored lm_head when tied)
            raise CheckpointError(f"{info.file}: tensor '{name}' is not a weight of the model in {source} "
                                  f"({layout.facts})")
        if name in seen:
            raise CheckpointError(f"{info.file}: tensor '{name}' is also in {seen[name]}")
        seen[name] = info.file
        if tuple(info.shape) != tuple(src_shapes[name]):
            raise CheckpointError(f"{info.file}: tensor '{name}' has shape {list(info.shape)} but {source} "
                                  f"implies {list(src_shapes[name])} ({layout.facts})")
        ri, j = rule_of[name]
        r = layout.rules[ri]
        slots = got.setdefault(ri, [None] * len(r.hf if to_mf else r.mf))
        slots[j] = info
        if all(s is not None for s in slots):
            order.append(ri)
    missing = [n for n in src_shapes if n not in seen]
    if missing:
        shown = ", ".join(f"'{k}'" for k in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{input_path}: missing tensor(s) {shown}{more} that {source} requires "
                              f"({layout.facts})")
    _, dst_shapes, _ = layout.side(to_mf)
    groups = []
    for ri in order:
        r, srcs = layout.rules[ri], got[ri]
        dtypes = {s.dtype for s in srcs}
        if len(dtypes) > 1:
            raise CheckpointError(f"{srcs[0].file}: tensors {', '.join(repr(s.name) for s in srcs)} are converted "
                                  f"together but have different dtypes ({', '.join(sorted(map(str, dtypes)))})")
        dst = r.mf if to_mf else r.hf
        if to_mf and r.assemble_mf is not None:
            make = r.assemble_mf
        else:
            make = functools.partial(Assembler, len(srcs), r.to_mf if to_mf else r.to_hf)
        groups.append(Group(list(srcs), [(n, dst_shapes[n]) for n in dst], make))
    return Plan(groups, list(OrderedDict.fromkeys(i.file for i in infos.values())))


def out_dtype(info: TensorInfo, dtype) -> np.dtype:
    """The dtype a tensor is written in: `dtype` for floating point inputs when given, else its own."""
    return dtype if (dtype is not None and is_float(info.dtype)) else info.dtype


def output_spec(p: Plan, dtype) -> List[Tuple[str, np.dtype, Tuple[int, ...]]]:
    """(name, dtype, shape) of every output tensor, in write order (writers with a spec place them up front)."""
    return [(n, out_dtype(g.srcs[0], dtype), shape) for g in p.groups for n, shape in g.outs]


def stream(p: Plan, dtype) -> Iterator[Tuple[str, np.ndarray]]:
    """(output name, array) of every group, reading each input tensor once, file by file in file order.

    An input is kept only until its group is complete; the group's outputs are yielded one by one (a
    generator rule produces each only when asked) and dropped before the next input is read."""
    groups = p.groups
    where: Dict[str, Dict[str, Tuple[int, int]]] = {}
    for gi, g in enumerate(groups):
        for j, s in enumerate(g.srcs):
            where.setdefault(s.file, {})[s.name] = (gi, j)
    pending: Dict[int, Assembler] = {}
    for path in p.files:
        sel = where.get(path)
        if not sel:
            continue
        for name, arr in iter_file(path, list(sel)):
            gi, j = sel[name]
            g = groups[gi]
            asm = pending.pop(gi, None) or g.make()
            asm.put(j, cast(arr, dtype, name=name, where=path))
            del arr
            if asm.left:
                pending[gi] = asm
                continue
            outs = asm.outputs()
            del asm
            for (oname, shape), out in zip(g.outs, outs):
                if tuple(out.shape) != tuple(shape):      # a bug in a rule, never the input's fault
                    raise CheckpointError(f"{path}: converting '{name}' gave '{oname}' of shape "
                                          f"{list(out.shape)}, expected {list(shape)}")
                yield oname, out
                del out
            del outs
    if pending:
        gi = next(iter(pending))
        raise CheckpointError(f"{groups[gi].srcs[0].file}: tensor group of '{groups[gi].srcs[0].name}' "
                              "was never completed while reading")


def write_all(writer, p: Plan, dtype):
    """Stream every group into `writer` and commit it; on any error the partial output is removed."""
    try:
        for name, arr in stream(p, dtype):
            writer.add(name, arr)
            del arr
    except BaseException:
        writer.abort()
        raise
    return writer.close()
