"""Stage 3: discover the channel groups of a network from its traced graph.

Every channel a layer produces is an *element*; the channel dimension of each tensor in the graph is a *layout*,
the element at each of its positions. Operations that keep channels aligned (BN, activations, pooling, residual
adds, depthwise convs, squeeze-excite gating) tie the elements at equal positions of their inputs and output; a
dense conv or linear layer creates new ones; `torch.cat` on the channel dimension puts layouts end to end and a
split or chunk cuts them, so a consumer of a concatenation holds several groups' channels side by side. Tied
elements are one channel; the channels that some producer's output ties together are a group: removing channel
`c` of a group removes it wherever it sits (the producing convs' filters, the BNs, the depthwise filters, the
consumers' input slices) at once, so the pruned network keeps its structure. Grouped convs (and chunks) keep
the channel count equal in each of their conv-groups: a group they touch has *blocks*, and keeps as many
channels in each.

Following the layouts through a torch.fx trace is `kpid_zoo.engine._layouts`'s work (with one handler per layer type,
`kpid_zoo.engine.handlers`); this module holds the result types and turns the tied channels into groups (`_collect`).

Some ops mix neighbouring channels with parameters that do not depend on the channel count (ECA's Conv1d gate
runs over the channel axis). Removing a channel from such a space leaves a valid network, but one that no longer
equals its parent with that channel zeroed: the group stays prunable, marked *inexact* with the reason. Specs can
always express its widths; the knapsack prunes it only when asked to (`GroupGraph.exact_only`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ._layouts import follow_layouts
from .handlers import (  # noqa: F401 (re-exported)
    ROLE_CHANNEL,
    ROLE_CONV_GROUPS,
    ROLE_DW,
    ROLE_HEADS,
    ROLE_IN,
    ROLE_NORM,
    ROLE_OUT,
    ROLE_PARAM,
    LayerHandler,
    ParameterHandler,
    handler_for,
)
from .tracing import Elements, Layout, Member, TraceContext  # noqa: F401 (Member re-exported)


@dataclass(frozen=True, eq=False)
class ChannelMap:
    """Where the positions of one channel dimension come from: the group (index into `GroupGraph.groups`, -1 for
    channels of no group, such as the network input) and the channel within that group, position by position."""

    group: np.ndarray
    channel: np.ndarray

    def __len__(self) -> int:
        return len(self.group)

    def kept(self, masks: dict[int, np.ndarray]) -> np.ndarray:
        """Positions that stay when group i keeps the channels where masks[i] is True (other groups stay whole)."""
        keep = np.ones(len(self), dtype=bool)
        for gi, mask in masks.items():
            at = self.group == gi
            keep[at] = mask[self.channel[at]]
        return np.flatnonzero(keep)

    def multiplicity(self, gi: int) -> int:
        """How many positions each channel of group gi takes here (the engine makes it the same for all)."""
        at = self.group == gi
        return int(at.sum()) // (int(self.channel[at].max()) + 1) if at.any() else 0

    def identity_of(self) -> int | None:
        """The group whose channels this dimension is, each once and in order; None if it is not exactly one."""
        if (
            len(self)
            and (self.group == self.group[0]).all()
            and self.group[0] >= 0
            and (self.channel == np.arange(len(self))).all()
        ):
            return int(self.group[0])
        return None


@dataclass
class ChannelGroup:
    """Channels that must be kept or removed together."""

    name: str
    size: int
    members: tuple[Member, ...]
    prunable: bool
    reason: str = ''
    inexact: str = ''  # why pruning it changes the kept channels' values too ("" for an exact group)
    blocks: tuple[int, ...] = ()  # block of each channel (grouped convs keep as many in each); () for one block

    @property
    def exact(self) -> bool:
        return not self.inexact

    @property
    def parts(self) -> int:
        """Number of blocks: a width must be a multiple of it, with width / parts channels kept in each block."""
        return max(self.blocks) + 1 if self.blocks else 1

    @property
    def unit(self) -> str:
        """What one of its channels is: "heads" for an attention layer's heads (each head_dim wide), else "ch"."""
        return 'heads' if any(m.role == ROLE_HEADS for m in self.members) else 'ch'

    def block_index(self) -> list[torch.Tensor]:
        """The channels of each block, in order."""
        if not self.blocks:
            return [torch.arange(self.size)]
        b = torch.tensor(self.blocks)
        return [torch.nonzero(b == i).flatten() for i in range(self.parts)]

    def leading(self, width: int) -> torch.Tensor:
        """The first width / parts channels of each block: a keep of that width that any grouped conv accepts
        (fresh weights, or timing, where which channels stay does not matter)."""
        return torch.cat([b[: width // self.parts] for b in self.block_index()]).sort().values

    def modules(self, role: str | None = None) -> list[str]:
        return [m.module for m in self.members if role is None or m.role == role]


@dataclass
class GroupGraph:
    """All channel groups of a model, in graph order, plus where each module's output channels live."""

    groups: list[ChannelGroup]
    module_out_group: dict[str, str] = field(default_factory=dict)
    global_pool_group: str | None = None
    layouts: dict[Member, ChannelMap] = field(default_factory=dict)  # each member's dimension, position by position
    outputs: dict[str, ChannelMap] = field(default_factory=dict)  # each module's output channels
    global_pool: ChannelMap | None = None  # the channels entering the global pool
    param_dims: dict[str, int] = field(default_factory=dict)  # bare parameters: their channel dimension

    def __post_init__(self) -> None:
        self._by_name = {g.name: g for g in self.groups}
        self._index = {g.name: i for i, g in enumerate(self.groups)}

    def __getitem__(self, name: str) -> ChannelGroup:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(
                f'no channel group named {name!r}; groups are named by their first producer, '
                f'e.g. {self.groups[0].name!r}'
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def index(self, name: str) -> int:
        return self._index[name]

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    @property
    def inexact(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable and not g.exact]

    def exact_only(self) -> GroupGraph:
        """The same graph with its inexact groups fixed at full width (what the knapsack sees by default)."""
        groups = [
            g
            if g.exact or not g.prunable
            else dataclasses.replace(
                g,
                prunable=False,
                reason=f'inexact ({g.inexact}); a recipe prunes it with importance.allow_inexact: true',
            )
            for g in self.groups
        ]
        return dataclasses.replace(self, groups=groups, module_out_group=dict(self.module_out_group))

    def resolve(self, model: nn.Module, member: Member) -> tuple[LayerHandler, nn.Module]:
        """The handler of a member and the module it is called with (a bare parameter's owner)."""
        if member.role == ROLE_PARAM:
            owner, _, attr = member.module.rpartition('.')
            return ParameterHandler(attr, self.param_dims[member.module]), model.get_submodule(owner)
        module = model.get_submodule(member.module)
        return handler_for(module), module

    def masks(self, keep: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
        """Group index -> which of its channels stay, for the groups named in `keep`."""
        out = {}
        for name, idx in keep.items():
            mask = np.zeros(self[name].size, dtype=bool)
            mask[np.asarray(idx, dtype=np.int64)] = True
            out[self.index(name)] = mask
        return out

    def width(self, channels: ChannelMap, widths: dict[str, int]) -> int:
        """How many positions `channels` keeps when each group named in `widths` keeps that many channels."""
        total = 0
        for gi in np.unique(channels.group):
            at = int((channels.group == gi).sum())
            if gi < 0 or self.groups[gi].name not in widths:
                total += at
            else:
                total += channels.multiplicity(int(gi)) * widths[self.groups[gi].name]
        return total


def discover_groups(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> GroupGraph:
    """Trace `model` and return its channel groups (see the module docstring for the rules)."""
    traced = follow_layouts(model, input_size)
    return _collect(traced.context, traced.module_out, traced.global_pool)


def _collect(ctx: TraceContext, module_out: dict[str, Layout], pool: Layout | None) -> GroupGraph:
    """Channels -> groups.

    The channels that some producer's output ties together are one group, unless some members hold only part of
    them (a split, a concatenation that a residual add ties to one conv): then the channels every member holds
    alike form a group of their own, so that the widths of the groups say how wide every member is. The blocks
    of a grouped conv or chunk stay in one group, with as many channels kept in each."""
    roots = ctx.roots()
    n = len(roots)
    linked = Elements()
    linked.new(n)
    linked.union(np.arange(n), roots)
    for elements, _ in ctx.spaces:
        if len(elements):
            linked.union(elements, np.full(len(elements), elements[0]))
    component = linked.find(np.arange(n))

    # what each member holds of each channel, hashed: channels with the same signature are held alike
    signature = np.zeros(n, dtype=np.uint64)
    hashes = np.random.default_rng(0).integers(1, 2**63, size=len(ctx.members), dtype=np.uint64)
    for h, layout in zip(hashes, ctx.members.values()):
        np.add.at(signature, roots[layout], h)

    producer_of: dict[int, str] = {}
    for elements, producer in ctx.spaces:
        if producer is not None and len(elements):
            producer_of.setdefault(int(component[elements[0]]), producer)
    # channels in graph order of the spaces that hold them, split by signature
    part_of = np.full(n, -1, dtype=np.int64)  # by channel root
    part_key: dict[tuple[int, int], int] = {}
    part_component: list[int] = []
    order: list[int] = []
    for elements, _ in ctx.spaces:
        for r in dict.fromkeys(roots[elements].tolist()):
            c = int(component[r])
            if c in producer_of and part_of[r] < 0:
                key = (c, int(signature[r]))
                if key not in part_key:
                    part_key[key] = len(part_component)
                    part_component.append(c)
                part_of[r] = part_key[key]
                order.append(r)
    parts = Elements()
    parts.new(len(part_component))

    def part_positions(layout: Layout) -> np.ndarray:
        return part_of[roots[layout]]

    for layout, _, where in ctx.balanced:  # a grouped conv's blocks are one group
        p = part_positions(layout)
        if len(p) and (p >= 0).all() and len({part_component[i] for i in np.unique(p)}) == 1:
            parts.union(p, np.full(len(p), p[0]))
    final = parts.find(np.arange(len(part_component))) if part_component else np.zeros(0, dtype=np.int64)

    # number the groups by component, then by first channel, and their channels in order
    group_index: dict[int, int] = {}
    names: list[str] = []
    named_in: dict[int, int] = {}
    group_of = np.full(n, -1, dtype=np.int64)
    channel_of = np.full(n, -1, dtype=np.int64)
    sizes: list[int] = []
    by_component: dict[int, list[int]] = {}
    for r in order:
        by_component.setdefault(part_component[part_of[r]], []).append(r)
    for c in sorted(by_component, key=lambda c: by_component[c][0]):
        for r in by_component[c]:
            f = int(final[part_of[r]])
            if f not in group_index:
                group_index[f] = len(names)
                k = named_in.get(c, 0)
                names.append(producer_of[c] if k == 0 else f'{producer_of[c]}#{k}')
                named_in[c] = k + 1
                sizes.append(0)
            gi = group_index[f]
            group_of[r], channel_of[r] = gi, sizes[gi]
            sizes[gi] += 1
    if len(names) != len(set(names)):
        raise AssertionError('channel group names collide')  # producers are unique per component

    def cmap(layout: Layout) -> ChannelMap:
        r = roots[layout]
        return ChannelMap(group_of[r], channel_of[r])

    reasons: dict[int, str] = {}
    inexact: dict[int, str] = {}
    for marks, records in ((reasons, ctx.blocked), (inexact, ctx.inexact)):
        for layout, reason in records:
            for gi in np.unique(group_of[roots[layout]]):
                if gi >= 0:
                    marks.setdefault(int(gi), reason)

    blocks: dict[int, np.ndarray] = {}
    for layout, count, where in ctx.balanced:
        cm = cmap(layout)
        if len(cm) % count == 0 and _blocks_alike(cm, count):
            continue  # every block holds the same channels (GluMlp's halves, tied by their product): always balanced
        touched = {int(g) for g in cm.group if g >= 0}
        gi = int(cm.group[0]) if len(cm) else -1
        if (
            len(cm) % count
            or len(touched) != 1
            or (cm.group != gi).any()
            or sorted(cm.channel.tolist()) != list(range(sizes[gi]))
        ):
            for g in touched:
                reasons.setdefault(g, f'{where}: its blocks do not hold whole channels of one group')
            continue
        block = np.empty(sizes[gi], dtype=np.int64)
        block[cm.channel] = np.arange(len(cm)) // (len(cm) // count)
        combined = blocks.get(gi, np.zeros_like(block)) * count + block
        blocks[gi] = np.unique(combined, return_inverse=True)[1].reshape(-1)
    for gi, block in blocks.items():
        counts = np.bincount(block)
        if (counts != counts[0]).any():
            reasons.setdefault(gi, 'grouped convs with conv-groups that do not nest')

    layouts = {m: cmap(lay) for m, lay in ctx.members.items()}
    members: list[list[Member]] = [[] for _ in names]
    for m, cm in layouts.items():
        for gi in dict.fromkeys(int(g) for g in cm.group if g >= 0):
            members[gi].append(m)
            counts = np.bincount(cm.channel[cm.group == gi], minlength=sizes[gi])
            block = blocks.get(gi, np.zeros(sizes[gi], dtype=np.int64))
            for b in np.unique(block):  # every block held alike, so the group's width says this member's
                if (counts[block == b] != counts[block == b][0]).any():
                    reasons.setdefault(gi, f'{m.module}: holds the channels of this group unevenly')

    groups = [
        ChannelGroup(
            names[gi],
            sizes[gi],
            tuple(members[gi]),
            gi not in reasons,
            reasons.get(gi, ''),
            inexact.get(gi, ''),
            tuple(int(b) for b in blocks[gi]) if gi in blocks else (),
        )
        for gi in range(len(names))
    ]
    outputs = {m: cmap(lay) for m, lay in module_out.items()}
    module_out_group = {m: names[gi] for m, cm in outputs.items() if (gi := cm.identity_of()) is not None}
    pool_map = cmap(pool) if pool is not None else None
    pool_gi = pool_map.identity_of() if pool_map is not None else None
    return GroupGraph(
        groups,
        module_out_group,
        names[pool_gi] if pool_gi is not None else None,
        layouts,
        outputs,
        pool_map,
        dict(ctx.param_dims),
    )


def _blocks_alike(cm: ChannelMap, count: int) -> bool:
    """Whether the `count` consecutive blocks of `cm` hold the same channels, position by position."""
    group, channel = cm.group.reshape(count, -1), cm.channel.reshape(count, -1)
    return bool((group == group[0]).all() and (channel == channel[0]).all())
