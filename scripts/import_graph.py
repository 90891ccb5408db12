"""Imports between mindformers_sft modules: circles, and arrows that point up the layers of ARCHITECTURE.md.

    python scripts/import_graph.py [--arrows]

Reads the source (nothing is imported). Module-level imports and lazy ones (inside a function) are reported
apart. Exit status 1 when a module-level circle exists.
"""
import ast
import collections
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mindformers_sft")
PKG = "mindformers_sft"
# ARCHITECTURE.md's order: a module may import modules of its own layer or of a layer before it
LAYERS = [
    ["errors", "checkpoint.dtypes", "checkpoint.tensors", "checkpoint.atomic", "checkpoint.safetensors_io",
     "checkpoint.ckpt_io", "checkpoint.io", "checkpoint.verify", "checkpoint"],
    ["config"], ["tokenizer"], ["data"], ["models"], ["pet"], ["parallel"],
    ["convert.names", "convert.names_qwen3", "convert.spec", "convert.layouts", "convert.layout_qwen3", "convert.plan"],
    ["checkpoint.training_state", "checkpoint.loading", "checkpoint.transform", "checkpoint.merge"],
    ["convert"], ["trainer"], ["build"], ["pretrained"], ["generation"], ["serving", "evaluation"], ["run"],
    ["cli", "tools", "<root>"],
]


def modules():
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                name = os.path.relpath(p, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[name[:-9] if name.endswith(".__init__") else name] = p
    return out


def edges(mods):
    """(importer, imported, lazy) for every import of a package module."""
    out = set()
    for src, path in mods.items():
        base = src if path.endswith("__init__.py") else src.rsplit(".", 1)[0]

        def targets(node):
            if isinstance(node, ast.Import):
                return [a.name for a in node.names]
            full = node.module or ""
            if node.level:
                parts = base.split(".")
                parts = parts[:len(parts) - node.level + 1]
                full = ".".join(parts) + ("." + node.module if node.module else "")
            return [full + "." + a.name if full + "." + a.name in mods else full for a in node.names]

        def walk(node, lazy):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    out.update((src, t, lazy) for t in targets(child) if t.startswith(PKG) and t != src)
                walk(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
        walk(ast.parse(open(path, encoding="utf-8").read()), False)
    return out


def layer(mod):
    rel = mod[len(PKG) + 1:] if mod != PKG else "<root>"
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (rel == n or rel.startswith(n + ".")) and (best is None or len(n) > best[1]):
                best = (i, len(n))
    return best[0] if best else len(LAYERS) - 1


def circles(graph):
    index, low, stack, on, out, count = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = count[0]
        count[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main(argv):
    mods = modules()
    es = edges(mods)
    top, every = collections.defaultdict(set), collections.defaultdict(set)
    for s, t, lazy in es:
        every[s].add(t)
        if not lazy:
            top[s].add(t)
    top_circles, all_circles = circles(top), circles(every)
    print("module-level circles:", top_circles or "none")
    print("circles with lazy imports:", all_circles or "none")
    up = sorted((s, t, lazy) for s, t, lazy in es if layer(t) > layer(s))
    print(f"arrows pointing up the layers: {len(up) or 'none'}")
    for s, t, lazy in up:
        print(f"  {s} -> {t}{' (lazy)' if lazy else ''}")
    if "--arrows" in argv:
        for s, t, lazy in sorted(es):
            print(f"{s} -> {t}{' (lazy)' if lazy else ''}")
    return 1 if top_circles else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
