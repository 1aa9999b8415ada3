"""The fusion report: which sites were fused, which near-misses were skipped and why.

Every fusion pass records into a :class:`Report`. A *site* is one replaced subgraph, named by the
module it came from (read off ``node.meta["nn_module_stack"]``). A *skip* is a candidate that looked
like a pattern but failed one of its checks; its reason is a stable, lowercase constant defined next
to the pattern (tests import it).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from collections import Counter, defaultdict

from slothc.options import FUSIONS

log = logging.getLogger("slothc")


@dataclasses.dataclass(frozen=True)
class Site:
    """One fused site."""

    fusion: str
    module: str  # module path, e.g. "model.layers.0.input_layernorm"
    node: str  # name of the replaced output node in its FX graph
    graph: int = 0  # index of the compiled graph (Dynamo may split a model into several)
    variant: str = ""  # which spelling matched, e.g. "llama"


@dataclasses.dataclass(frozen=True)
class Skip:
    """One near-miss: a candidate left unfused, and why."""

    fusion: str
    module: str
    reason: str
    node: str = ""
    graph: int = 0


@dataclasses.dataclass
class Report:
    fused: dict = dataclasses.field(default_factory=lambda: defaultdict(list))
    skipped: list = dataclasses.field(default_factory=list)
    graphs: int = 0
    notes: list = dataclasses.field(default_factory=list)  # e.g. fallbacks of the whole graph
    # per graph, Dynamo's (frame id, compile of that frame) where known: a second compile of one frame
    # is a recompile (new shapes, a failed guard), another frame is a piece after a graph break
    compiles: list = dataclasses.field(default_factory=list)

    def count(self, fusion: str) -> int:
        return len(self.fused.get(fusion, ()))

    def modules(self, fusion: str) -> list:
        return [s.module for s in self.fused.get(fusion, ())]

    def per_graph(self) -> list:
        """``{fusion: sites}`` of each compiled graph, in compile order: what each piece of a split
        model fused (at Dynamo's graph breaks, or DDPOptimizer's pieces at DDP bucket boundaries)."""
        counts = [Counter() for _ in range(self.graphs)]
        for name in self._names():
            for site in self.fused[name]:
                counts[site.graph][name] += 1
        return [dict(c) for c in counts]

    def _names(self) -> list:
        return [f for f in FUSIONS if self.fused.get(f)] + [f for f in self.fused if f not in FUSIONS and self.fused[f]]

    def add_site(self, site: Site) -> None:
        self.fused[site.fusion].append(site)

    def add_skip(self, skip: Skip) -> None:
        self.skipped.append(skip)

    def __str__(self) -> str:
        lines = [f"slothc fusion report ({self.graphs} graph{'s' if self.graphs != 1 else ''})"]
        names = self._names()
        if not names:
            lines.append("  fused: nothing")
        for name in names:
            sites = self.fused[name]
            lines.append(f"  fused {name}: {len(sites)} site{'s' if len(sites) != 1 else ''}")
            for site in sites:
                variant = f"  [{site.variant}]" if site.variant else ""
                lines.append(f"    {site.module or '<top level>'}{variant}")
        if self.skipped:
            lines.append(f"  skipped: {len(self.skipped)}")
            for skip in self.skipped:
                lines.append(f"    {skip.fusion:<12} {skip.module or '<top level>'}: skipped: {skip.reason}")
        if self.graphs > 1:
            lines.append("  per graph:")
            for i, counts in enumerate(self.per_graph()):
                fused = ", ".join(f"{f} {n}" for f, n in counts.items()) or "nothing fused"
                skips = sum(1 for s in self.skipped if s.graph == i)
                lines.append(f"    graph {i}: {fused}" + (f"; {skips} skipped" if skips else ""))
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


def emit(report: Report) -> None:
    """Log a report at compile time (``options={"report": True}``)."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    log.info("%s", report)


_INDEX = re.compile(r"\[(\d+)\]")
_QUOTED = re.compile(r"\[['\"]([^'\"]+)['\"]\]")


def module_path(node) -> str:
    """Clean module path of a node, from Dynamo's ``nn_module_stack`` metadata.

    Dynamo writes paths like ``L['self'].__dict__['_modules']['base_model'].model.layers.0.mlp``;
    this returns ``base_model.model.layers.0.mlp``.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    paths = [entry[0] for entry in stack.values()]
    # A module held in a global is not in the model's tree: transformers 5.25 calls functions such as
    # apply_rotary_pos_emb through the `kernels` package's module wrappers (G['...'].apply_rotary_pos_emb);
    # the site is then named after the model's module that called it.
    in_tree = [p for p in paths if not p.startswith("G[")]
    path = (in_tree or paths)[-1]
    path = path.replace(".__dict__['_modules']", "").replace("__dict__['_modules']", "")
    path = _QUOTED.sub(r".\1", path)
    path = _INDEX.sub(r".\1", path)
    path = re.sub(r"^L\.self\.?", "", path)
    path = re.sub(r"^L\.args\.\d+\.?", "", path)  # a module passed through a wrapper (HF decorators)
    path = re.sub(r"^L__self___?", "", path)
    return path.strip(".")
