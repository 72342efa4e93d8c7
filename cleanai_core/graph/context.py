"""Channel labels: how the kernel and plugins describe coupling while tracing.

Every prunable channel of a producer (a conv's output channel, a bare parameter's
column...) is an *atom*, an integer. A traced tensor carries at most one labelled
dimension: a vector of atom ids, one per index of that dimension. Plugins map labels
through operations; when two tensors must shrink together they *union* atoms; when a
tensor cannot shrink they *freeze* atoms. After tracing, atoms joined by unions form
*units* (the smallest thing that can be pruned) and units touching the same slices
form a :class:`~cleanai_core.graph.groups.Group`.

A *slice* is one dimension of one module's tensors that shrinks with channels, e.g.
``("layer1.0.conv1", "out")``; it keeps, for each of its indices, the atom it belongs to
(the root index). After pruning, the kept indices of a slice are the positions whose
unit survived.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import attrs
import torch

from cleanai_core.graph.findings import ModelFindings
from cleanai_core.graph.statistics import Statistics
from cleanai_core.graph.trace import TRef
from cleanai_core.graph.unbound import Unbinds

__all__ = [
    "COUNT_MARK",
    "CROSS_MARK",
    "INDEX_MARK",
    "Label",
    "SliceSpec",
    "TraceContext",
    "is_count_slice",
    "is_index_slice",
    "tensor_name",
]

#: a bare 2-D tensor used as a matrix (``x @ self.proj``) shrinks along both dimensions:
#: its second slice is named ``"<tensor>#<dim>"`` (the first one keeps the tensor's name)
CROSS_MARK = "#"

#: a bare integer tensor that holds channel positions (``x[:, self.perm]``,
#: ``x.index_select(1, self.perm)``) is a slice named ``"<tensor>@"`` of kind ``"index"``:
#: its atoms are those of the positions it points into, and pruning rewrites its values
#: (drops the entries that point at removed positions, renumbers the others) instead of
#: cutting a dimension of it
INDEX_MARK = "@"

#: a plain int attribute of a module that holds a number of channels its ``forward`` reads
#: (YOLOv8's ``C2f``: ``self.cv1(x).split((self.c, self.c), 1)``) is a slice named
#: ``"<module>.<attribute>=<n>"`` (``n``: the how-manieth op that reads it) of kind
#: ``"count"``: its atoms are the channels the number counts, and pruning sets the
#: attribute to the number kept; no tensor is cut or zeroed
COUNT_MARK = "="


def tensor_name(slice_name: str) -> str:
    """The qualified tensor name of a bare tensor's slice (``"proj#0"`` -> ``"proj"``,
    ``"perm@"`` -> ``"perm"``; an attribute's for a count, ``"m.c=0"`` -> ``"m.c"``)."""
    name = slice_name.partition(CROSS_MARK)[0].removesuffix(INDEX_MARK)
    return name.rpartition(COUNT_MARK)[0] if is_count_slice(name) else name


def is_index_slice(slice_name: str) -> bool:
    """Whether a bare tensor's slice is an index tensor's (see :data:`INDEX_MARK`)."""
    return slice_name.endswith(INDEX_MARK)


def is_count_slice(slice_name: str) -> bool:
    """Whether a bare slice is a module's stored channel count (see :data:`COUNT_MARK`):
    its last part is ``<attribute>=<n>``. A module name may hold the mark too (an
    ``nn.ModuleDict`` key ``"s=1"``: its tensor ``blocks.s=1.g`` is no count; read as one,
    prune() failed with "'ModuleDict' object has no attribute 's'")."""
    return _COUNT_PART.fullmatch(slice_name.rpartition(".")[2]) is not None


#: the last part of a count slice's name (:data:`COUNT_MARK`): an attribute, the mark, a number
_COUNT_PART = re.compile(rf"[A-Za-z_]\w*{re.escape(COUNT_MARK)}\d+")


#: ops that lay out an index tensor's values without changing them (see :meth:`TraceContext.index_source`)
_INDEX_LAYOUT_OPS = frozenset(
    {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "expand", "alias", "clone", "contiguous",
     "_to_copy", "lift_fresh", "detach"}
)  # fmt: skip


def _one_long_dim(shape: tuple[int, ...]) -> int | None:
    """The one dimension of ``shape`` longer than one, every other of size one (a 1-D index
    buffer, or one stored laid out for ``gather``: ``(1, C, 1, 1)``); ``None`` otherwise."""
    long = [d for d, s in enumerate(shape) if s > 1]
    return long[0] if len(long) == 1 else (0 if len(shape) == 1 and shape[0] == 1 else None)


@attrs.define(slots=True)
class Label:
    """The labelled dimension of a traced tensor."""

    dim: int
    atoms: torch.Tensor  # int64, one atom per index of ``dim``
    origin: tuple[int, int, tuple[int, ...]] | None = None  # (event, chosen, candidates) of a reshape split
    #: a second labelled dimension ``(dim, atoms)``: a 2-D weight read outside its module
    #: (rows and columns both follow channels); only ``t`` and matrix products carry it
    cross: tuple[int, torch.Tensor] | None = None


@attrs.define(slots=True, eq=False)
class SliceSpec:
    """One dimension of one module's tensors that shrinks with channels.

    ``kind``: ``"out"`` (a producer's channels), ``"in"`` (a consumer's input
    channels; ``arg``/``dim`` say where the consumer reads them, for calibration),
    ``"param"`` (a tensor that follows channels: norm affine, bare parameters) or
    ``"index"`` (a bare integer tensor of channel positions, :data:`INDEX_MARK`) or
    ``"count"`` (a module's int attribute that counts channels, :data:`COUNT_MARK`).
    ``multiple``: the slice's kept channels must be a multiple of it (a kernel's
    alignment: transformers' grouped expert matmul needs rows of 16 bytes); the plan
    rounds the kept count up. ``same_count``: slices that name the same key keep the same
    number of channels (the experts of one 3-D tensor); their groups are planned, and
    skipped by verification, together. ``same_share``: the same, in proportion to their
    groups' sizes (one key space with ``same_count``): a group twice as wide keeps twice
    as many units (shared experts whose width a config derives as the routed experts'
    width times their number; see ``cleanai_core.graph.findings.SAME_SHARE``).
    """

    module: str
    name: str
    kind: str
    atoms: torch.Tensor
    arg: int | str | None = None
    dim: int | None = None
    normalizes: bool = False  # the module normalises across this slice (LayerNorm, GroupNorm)
    pruner: Any = None
    multiple: int = 1
    same_count: str | None = None
    same_share: str | None = None
    #: an ``"in"`` slice's traced input ``(tensor key, channel dim)`` where its module ran
    #: once in the trace (else None): consumers with the same ``reads`` read one tensor,
    #: and calibration counts their shared co-moment once against its budget
    reads: tuple[int, int] | None = None


class TraceContext:
    """What a :class:`LayerPruner` or :class:`IndexMapper` sees while tracing."""

    def __init__(self, split_choices: dict[int, int] | None = None, findings: ModelFindings | None = None) -> None:
        self.n_atoms = 0
        self._unions: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._frozen: list[tuple[torch.Tensor, str]] = []
        self._labels: dict[int, Label] = {}
        self.slices: dict[tuple[str, str], SliceSpec] = {}
        self.split_choices = split_choices or {}
        self.split_requests: dict[int, int] = {}
        self.unknown_ops: Counter[str] = Counter()
        self.event: Any = None  # the event being traced (for messages and split origins)
        self._consumed: set[int] = set()
        self.param_dims: dict[str, int | bool | None] = {}
        self.param_owner: dict[str, str] = {}
        self.owners: dict[str, tuple[Any, Any]] = {}  # claimed module name -> (module, pruner)
        self._cross: list[tuple[torch.Tensor, str]] = []  # second labels handed out, with their tensor
        self._cross_taken: set[int] = set()
        #: a bare matrix's second labels, by ``id``: (tensor name, dimension), bound as a slice when taken
        self._bare_cross: dict[int, tuple[str, int]] = {}
        #: the atoms of bare tensors' labels, by ``id`` (kept alive by their labels)
        self._bare_atoms: set[int] = set()
        self._cross_used: set[int] = set()  # second labels the event being traced took or passed on
        #: bare tensors' labels first made by the event being traced on a guessed dim (:meth:`regard_bare`)
        self._bare_guess: set[int] = set()
        #: second labels an op met and neither took nor passed on (frozen there): they reached a reader
        self._cross_met: set[int] = set()
        self.modules: dict[str, Any] = {}  # the model's modules by name (see scope_module)
        #: the event that produced each traced tensor so far, by key (see :meth:`index_source`)
        self.made_by: dict[int, Any] = {}
        #: what ``cleanai_prepare_model`` found in the traced model (see graph/findings.py)
        self.findings: ModelFindings = findings if findings is not None else ModelFindings()
        #: keys of traced tensors whose channels may be split into unequal parts, each part
        #: shrinking on its own: a pruner vouches for them while tracing because a fix-up
        #: rewrites the split sizes after slicing (the split mapper reads this)
        self.unequal_splits: set[int] = set()
        self.whole_heads: set[str] = set()  # attention modules whose reshape splits keep the heads
        #: the plain ints each module's forward was handed (``self.attn(x, self.heads)``), by name
        self.call_numbers: dict[str, set[int]] = {}
        #: ``(owner, attribute, reason)`` of tensors read outside their claimed module that no
        #: pruner labelled: the owner's slices that cut them are frozen after tracing
        self.outside_reads: list[tuple[str, str, str]] = []
        #: keys of parameters read only to maintain themselves (:func:`~cleanai_core.graph.trace.maintenance_reads`)
        self.maintenance: set[int] = set()
        #: ``(tensor name, label)`` of tensors read outside their claimed module that the
        #: pruner labelled (``F.linear(x, m.weight, bias)``): the masking oracle zeroes their
        #: pruned indices itself, since no hook of the module sees that read
        self.labelled_outside: list[tuple[str, Label]] = []
        #: keys of unlabelled traced tensors that repeat one value along some dimensions (a
        #: size-1 dimension expanded: ``F.normalize``'s ``norm(x, keepdim=True).expand_as(x)``),
        #: with those dimensions: combined with channels there, they shrink with them
        self.spread: dict[int, set[int]] = {}
        #: atoms an op normalises across (``F.layer_norm`` outside a claimed module): see :meth:`normalize`
        self.normalized: list[torch.Tensor] = []
        #: statistics over channels kept as a size-1 dim (a norm written by hand): see :meth:`statistic`
        self.statistics = Statistics()
        #: modules whose pruner ties coarser units on this pass (see :meth:`offer_coarser`)
        self.coarse: set[str] = set()
        #: ``module -> (atoms, ...)`` offered by pruners that could tie coarser units
        self.coarse_offers: dict[str, tuple[torch.Tensor, ...]] = {}
        #: the whole recording's events, in order (a mapper may look at what reads a tensor
        #: it makes: :meth:`readers`)
        self.events: list[Any] = []
        self._readers: dict[int, list[Any]] | None = None
        #: channels unbound one by one (``x.unbind(1)``) on their way to a restack (graph/unbound.py)
        self.unbinds = Unbinds()

    # -- atoms ---------------------------------------------------------------
    def new_atoms(self, n: int, frozen: str | None = None) -> torch.Tensor:
        """``n`` fresh atoms; frozen with ``frozen`` as the reason when given."""
        atoms = torch.arange(self.n_atoms, self.n_atoms + n)
        self.n_atoms += n
        if frozen:
            self.freeze(atoms, frozen)
        return atoms

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Atoms ``a[i]`` and ``b[i]`` must be pruned together."""
        a, b = a.reshape(-1), b.reshape(-1)
        if a.numel() != b.numel():
            raise ValueError(f"union of {a.numel()} and {b.numel()} atoms")
        if a.numel():
            self._unions.append((a, b))

    def freeze(self, atoms: torch.Tensor, reason: str) -> None:
        """These atoms (and every unit they join) are never pruned."""
        if atoms.numel():
            self._frozen.append((atoms.reshape(-1), reason))

    def normalize(self, atoms: torch.Tensor) -> None:
        """An op normalises across these atoms (``F.layer_norm`` over the channels): their
        groups may shrink, but not exactly (the statistics change with the channels, as a
        slice marked ``normalizes`` says for a norm module), so the masking oracle leaves
        them out (:attr:`~cleanai_core.graph.groups.Group.normalizes`)."""
        if atoms.numel():
            self.normalized.append(atoms.reshape(-1))

    def statistic(self, outputs: list[Any], atoms: torch.Tensor, reason: str) -> None:
        """``outputs`` are a statistic over the channels ``atoms`` that depends on their
        number (``x.mean(1, keepdim=True)``, a variance, a maximum), kept as a size-1 dim.
        Where it only comes back onto those same channels through element-wise ops (a
        LayerNorm, RMSNorm or response norm written by hand: ``(x - u) / sqrt(v + eps)``),
        the channels normalise (:meth:`normalize`) after tracing; where it reaches anything
        else, they freeze with ``reason``."""
        self.statistics.add(outputs, atoms, reason)

    def tie(self, atoms: torch.Tensor, shape: tuple[int, ...], keep_dim: int) -> torch.Tensor:
        """View ``atoms`` as ``shape`` and union along every dimension but ``keep_dim``;
        return one representative atom per index of ``keep_dim``."""
        grid = atoms.reshape(shape).movedim(keep_dim, 0).reshape(shape[keep_dim], -1)
        rep = grid[:, :1].expand_as(grid)
        self.union(rep, grid)
        return grid[:, 0].clone()

    def offer_coarser(self, module: str, *atoms: torch.Tensor) -> None:
        """A pruner that ties its channels finely could tie coarser units instead (a grouped
        conv: channel *j* of every group, or whole groups). ``atoms``: its slices' atoms
        under the fine ties. When one of them ends up a single unit (the fine ties met
        contiguous couplings elsewhere, as attention heads are, and the whole width became
        one unit), the kernel traces again with ``module`` in :attr:`coarse` and keeps the
        coarse ties where they leave more channels in groups of two units or more."""
        self.coarse_offers[module] = atoms

    def unbind_pieces(self, outputs: list[TRef], atoms: torch.Tensor) -> None:
        """``outputs`` are the channels ``atoms`` one by one, without a channel dimension
        (an unbind along the channels): they stay free if every piece is stacked back after
        the same work (:meth:`restack`), else they freeze after tracing, with the reason."""
        self.unbinds.add(outputs, atoms, self.where())

    def restack(self, tensors: list[Any]) -> torch.Tensor | None:
        """The unbound atoms, in their new order, when ``tensors`` (stacked or concatenated
        along one dimension) are every piece of one :meth:`unbind_pieces`, each once, after
        the same work; ``None`` otherwise."""
        return self.unbinds.restack(tensors, self)

    def request_split(self, origin: tuple | None, choice: int) -> bool:
        """Ask the kernel to trace again with reshape split ``origin`` keeping the
        sub-dimension ``choice`` instead. Returns ``False`` when that cannot help."""
        if origin is None or origin[1] == choice or choice < 0:
            return False
        event = origin[0]
        if self.split_choices.get(event) == choice:
            return False
        self.split_requests[event] = choice
        return True

    # -- tensors -------------------------------------------------------------
    def label_of(self, ref: Any) -> Label | None:
        """The label of a traced tensor (``None`` when it carries no channels)."""
        if not isinstance(ref, TRef):
            return None
        self._consumed.add(ref.key)
        lab = self._labels.get(ref.key)
        if lab is None and ref.param is not None:
            lab = self._param_label(ref)
        return lab

    def labels(self, ref: Any, dim: int) -> torch.Tensor:
        """Atoms along ``dim`` of ``ref``. When ``ref`` carries channels elsewhere, those
        are frozen; when it carries none along ``dim``, fresh frozen atoms are returned."""
        size = ref.shape[dim]
        dim = dim % ref.ndim
        lab = self.label_of(ref)
        if lab is not None and lab.dim == dim:
            return lab.atoms
        if lab is not None:
            self._ask_split_at(ref, lab, dim)
            self.freeze(lab.atoms, f"channels reach dim {dim} of a consumer reading dim {lab.dim} ({self.where()})")
        return self.new_atoms(size, frozen=f"input without traced channels ({self.where()})")

    def _ask_split_at(self, ref: Any, lab: Label, dim: int) -> None:
        """A consumer reads ``dim`` while the channels sit on another part of the same
        reshape split, laid out next to it as the split made them (``Linear(8, 160)`` viewed
        ``(-1, 4, 5, 8)`` for a conv reading the 4: the split kept the 8): ask the kernel to
        keep the part the consumer reads. Before 2026-12-01 such a view froze the channels."""
        if lab.origin is None:
            return
        _, choice, grid = lab.origin
        start = lab.dim - choice
        laid_out = start >= 0 and tuple(ref.shape[start : start + len(grid)]) == tuple(grid)
        if laid_out and start <= dim < start + len(grid):
            self.request_split(lab.origin, dim - start)

    def labels_elsewhere(self, ref: Any, dim: int) -> torch.Tensor:
        """Fresh frozen atoms for ``dim`` of ``ref``, whose channels sit on another
        dimension that the consumer passes through untouched (they stay labelled)."""
        return self.new_atoms(ref.shape[dim], frozen=f"input without traced channels ({self.where()})")

    def second_label(self, dim: int, atoms: torch.Tensor, what: str) -> tuple[int, torch.Tensor]:
        """A second labelled dimension ``(dim, atoms)`` for an output whose channels pass
        through on another dimension (a linear layer over the tokens: its rows on the last
        dimension). Frozen after tracing unless a consumer takes it
        (:meth:`take_cross`); ``what`` names it in the reason."""
        self._cross.append((atoms, what))
        return (dim, atoms)

    def merge_second(self, keep: Label, other: Label) -> bool:
        """Two inputs of an element-wise op carry second labelled dimensions that meet
        there (the halves of a gated token MLP, ``a * gelu(b)``): union them, ``keep``'s
        goes on. ``False`` (nothing done) for a bare matrix's, which binds its slice when taken."""
        a, b = keep.cross[1], other.cross[1]
        if a.numel() != b.numel() or id(a) in self._bare_cross or id(b) in self._bare_cross:
            return False
        self.union(a, b)
        self._cross_taken.add(id(b))
        self._cross_used.add(id(b))
        return True

    def split_second(self, lab: Label, sizes: list[int]) -> list[torch.Tensor] | None:
        """Equal parts of ``lab``'s second labelled dimension, tied index by index like a
        split of channels (a gated token MLP's ``chunk(2, -1)``); each part is frozen after
        tracing unless taken. ``None`` for unequal parts or a bare matrix's."""
        atoms = lab.cross[1]
        if len(set(sizes)) != 1 or id(atoms) in self._bare_cross:
            return None
        self.tie(atoms, (len(sizes), sizes[0]), 1)
        self._cross_taken.add(id(atoms))
        self._cross_used.add(id(atoms))
        parts = list(atoms.split(sizes[0]))
        for part in parts:
            self._cross.append((part, f"a part of the second labelled dimension split by {self.where()}"))
        return parts

    def set_label(
        self, ref: Any, dim: int, atoms: torch.Tensor, origin: Any = None, cross: tuple[int, torch.Tensor] | None = None
    ) -> None:
        if not isinstance(ref, TRef):
            return
        dim = dim % ref.ndim
        if ref.shape[dim] != atoms.numel():
            raise ValueError(f"{self.where()}: label of {atoms.numel()} atoms for dim {dim} of shape {ref.shape}")
        if cross is not None and ref.shape[cross[0] % ref.ndim] != cross[1].numel():
            raise ValueError(f"{self.where()}: cross label of {cross[1].numel()} atoms for shape {ref.shape}")
        self._labels[ref.key] = Label(dim, atoms, origin, cross)
        if cross is not None:
            self._cross_used.add(id(cross[1]))

    def pass_second(self, lab: Label) -> None:
        """``lab``'s second labelled dimension is dealt with by the op being traced (reduced
        where zeroed entries change nothing): not frozen for being ignored."""
        if lab.cross is not None:
            self._cross_used.add(id(lab.cross[1]))

    def take_cross(self, lab: Label) -> torch.Tensor:
        """The atoms of ``lab``'s second labelled dimension, for a mapper that couples them
        (a matrix product contracting them); those nobody takes are frozen after tracing."""
        assert lab.cross is not None
        atoms = lab.cross[1]
        self._cross_taken.add(id(atoms))
        self._cross_used.add(id(atoms))
        bare = self._bare_cross.get(id(atoms))
        if bare is not None:
            self.bind("", f"{bare[0]}{CROSS_MARK}{bare[1]}", atoms, "param", dim=bare[1])
        return atoms

    def freeze_untaken_cross(self, outputs: set[int] = frozenset()) -> None:
        """Freeze the second labels no op took: those an op met and ignored (:meth:`end`)
        and those that reach the model's ``outputs`` (ids). A second label that was only
        passed on to tensors nothing reads (a weight clipped in place by a parent's
        ``forward``, ``self.fc.weight.data.clamp_(-c, c)``, or its norm logged) constrains
        nothing, like a dead end's channels: it froze the consumer's input channels ("the
        second dimension of fc.weight reaches no operation that reads it")."""
        for atoms, param in self._cross:
            if id(atoms) not in self._cross_taken and (id(atoms) in self._cross_met or id(atoms) in outputs):
                bare = self._bare_cross.get(id(atoms))
                spec = self.slices.get(("", f"{bare[0]}{CROSS_MARK}{bare[1]}")) if bare is not None else None
                if spec is not None:  # another read contracted it: this one keeps it whole
                    self.union(spec.atoms, atoms)
                self.freeze(atoms, f"the second dimension of {param} reaches no operation that reads it")

    def copy_label(self, src: Any, dst: Any, dim_shift: int = 0) -> None:
        """Give ``dst`` the label of ``src`` (its dimension moved by ``dim_shift``)."""
        lab = self.label_of(src)
        if lab is not None and isinstance(dst, TRef):
            self.set_label(dst, lab.dim + dim_shift, lab.atoms, lab.origin)

    def freeze_tensor(self, ref: Any, reason: str) -> None:
        lab = self.label_of(ref)
        if lab is not None:
            self.freeze(lab.atoms, reason)

    # -- slices --------------------------------------------------------------
    def bind(self, module: str, name: str, atoms: torch.Tensor, kind: str, **meta: Any) -> None:
        """Register (or, on another call of the same module, couple) a slice."""
        key = (module, name)
        old = self.slices.get(key)
        if old is None:
            self.slices[key] = SliceSpec(module, name, kind, atoms, **meta)
        elif old.atoms.numel() == atoms.numel():
            self.union(old.atoms, atoms)
        else:
            self.freeze(old.atoms, f"{module} called with {atoms.numel()} and {old.atoms.numel()} channels")
            self.freeze(atoms, f"{module} called with {atoms.numel()} and {old.atoms.numel()} channels")

    def counted(self, attr: str, atoms: torch.Tensor) -> None:
        """The int attribute ``attr`` of the module whose ``forward`` runs the current op
        counts ``atoms`` (a split's part sized ``self.c``): a ``"count"`` slice
        (:data:`COUNT_MARK`), so pruning sets it to the number of those channels kept. Every
        op that reads it gets a slice of its own, tied to the others by ``same_count``: the
        channels each counts keep as many, not the same indices (two splits of different
        tensors that both read ``self.c``). A view's
        size equal to a stored number is no count: a head count equal to the head width made
        one of the head width."""
        scope = getattr(self.event, "scope", None) or ""
        key = f"{scope}.{attr}" if scope else attr
        same = [s for s in self.slices.values() if s.kind == "count" and s.same_count == key]
        if any(s.atoms.numel() == atoms.numel() and torch.equal(s.atoms, atoms) for s in same):
            return
        name = f"{key}{COUNT_MARK}{len(same)}"
        self.slices[("", name)] = SliceSpec("", name, "count", atoms, dim=0, same_count=key)

    def picked(self, index: Any, lab: Label) -> torch.Tensor | None:
        """The atoms that ``index`` picks along ``lab``'s dimension (``x[:, self.perm]``,
        ``x.index_select(1, self.perm)``), or ``None`` when it cannot follow them.

        ``index`` must be a 1-D integer buffer (or parameter) of the model with positions
        in range: it becomes an ``"index"`` slice over ``lab``'s atoms, and pruning
        rewrites its values to the kept positions (:data:`INDEX_MARK`). Any selection
        qualifies (a permutation, a subset, repeats). An index made in ``forward`` cannot
        be rewritten, nor can negative positions be renumbered without the width: ``None``."""
        values = self._positions(index, lab.atoms.numel())
        if values is None:
            return None
        self.bind("", f"{index.param}{INDEX_MARK}", lab.atoms, "index", dim=0)
        return lab.atoms[values]

    def placed(self, index: Any, lab: Label) -> torch.Tensor | None:
        """The atoms of a destination that ``index`` fills with ``lab``'s channels, one
        each (``out[:, self.perm] = x``: a permutation buffer, the inverse of
        :meth:`picked`), or ``None`` when it cannot follow them. The buffer becomes an
        ``"index"`` slice over the destination's atoms (rewritten like :meth:`picked`'s)."""
        values = self._positions(index, lab.atoms.numel())
        if values is None or values.numel() != lab.atoms.numel() or values.unique().numel() != values.numel():
            return None
        atoms = torch.empty_like(lab.atoms)
        atoms[values] = lab.atoms
        self.bind("", f"{index.param}{INDEX_MARK}", atoms, "index", dim=0)
        return atoms

    def index_source(self, index: Any, dim: int) -> Any:
        """The 1-D index buffer (or parameter) of the model that ``index`` lays out along
        its dimension ``dim``, broadcast along the others (``perm.view(1, -1, 1, 1)
        .expand_as(x)`` for ``gather``, ``perm.long()``, ``perm.unsqueeze(0).expand(B, -1)``),
        or ``None``: an index made from it by views, expands and copies holds its values,
        so rewriting the buffer rewrites the index too. Only ops that keep the buffer's
        one dimension (every other dimension of size one, or expanded from one) are
        followed."""
        if not isinstance(index, TRef):
            return None
        n = index.shape[dim] if 0 <= dim < index.ndim else -1
        at, ref = dim, index
        while ref.param is None:
            event = self.made_by.get(ref.key)
            op = getattr(event, "op", None)
            name = getattr(getattr(op, "overloadpacket", None), "__name__", "")
            src = event.args[0] if event is not None and event.args else None
            if name not in _INDEX_LAYOUT_OPS or not isinstance(src, TRef) or src.shape.count(n) != 1:
                return None
            if name == "expand":  # right-aligned: the buffer's dim keeps its place from the end
                at -= ref.ndim - src.ndim
            else:  # a view: every other dimension has size one
                if ref.shape.count(n) != 1 or math.prod(ref.shape) != n:
                    return None
                at = src.shape.index(n)
            if not 0 <= at < src.ndim or src.shape[at] != n or math.prod(src.shape) != n:
                return None
            ref = src
        return ref if _one_long_dim(ref.shape) == at else None

    def _positions(self, index: Any, size: int) -> torch.Tensor | None:
        """The values of ``index``, a 1-D integer buffer (or parameter) of the model holding
        positions in ``range(size)`` (or one with a single dimension longer than one, laid
        out for ``gather``); ``None`` for anything else."""
        if not isinstance(index, TRef) or index.param is None or _one_long_dim(index.shape) is None:
            return None
        if index.dtype not in (torch.int64, torch.int32):
            return None
        owner, _, attr = index.param.rpartition(".")
        holder = self.modules.get(owner)
        values = getattr(holder, attr, None) if holder is not None else None
        if not isinstance(values, torch.Tensor) or values.is_meta or not values.numel():
            return None
        values = values.detach().to("cpu", torch.int64).reshape(-1)
        if int(values.min()) < 0 or int(values.max()) >= size:
            return None
        return values

    def produce(self, module: str, name: str, n: int, **meta: Any) -> torch.Tensor:
        """Atoms of a producer slice: fresh on the first call of the module, the same on
        later calls (shared weights produce the same channels)."""
        old = self.slices.get((module, name))
        if old is not None and old.atoms.numel() == n:
            return old.atoms
        atoms = self.new_atoms(n)
        self.bind(module, name, atoms, "out", **meta)
        return atoms

    def _param_label(self, ref: TRef) -> Label | None:
        dim = self.param_dims.get(ref.param)
        if dim is False or not ref.shape or not (ref.dtype.is_floating_point or ref.dtype.is_complex):
            return None  # an integer buffer (CLIP's ``position_ids``) holds indices, not channels
        owner = self.param_owner.get(ref.param)
        if owner is not None and owner in self.owners:  # read outside its claimed module: ask its pruner
            module, pruner = self.owners[owner]
            lab = pruner.trace_param(module, owner, ref.param[len(owner) + 1 :] if owner else ref.param, self)
            if lab is not None:
                if lab.cross is not None:
                    self._cross.append((lab.cross[1], ref.param))
                self._labels[ref.key] = lab
                self.labelled_outside.append((ref.param, lab))
                return lab
            if ref.key in self.maintenance:
                # kept up by the model itself (clipped in place, a norm kept aside): it constrains
                # nothing, and its module's channels stay free (they froze before 2026-12-02)
                lab = Label(ref.ndim - 1, self.new_atoms(ref.shape[-1]))
                self._labels[ref.key] = lab
                return lab
        cross = None
        guessed = dim is None and ref.ndim > 1
        if dim is None:
            big = [i for i, s in enumerate(ref.shape) if s > 1]
            # the last dimension larger than one: a size-1 dimension only broadcasts (a GAT
            # scoring vector laid out ``(heads, width, 1)`` for ``bmm`` took its 1 before 2026-12-01)
            dim = big[-1] if big else len(ref.shape) - 1
            if len(big) == 2 and ref.ndim == 2:  # a matrix (``x @ self.proj``): rows may shrink too
                cross = (0, self.new_atoms(ref.shape[0]))
        guessed = guessed and cross is None
        dim = int(dim) % len(ref.shape)
        key = ("", ref.param)
        fresh = key not in self.slices
        atoms = self.produce("", ref.param, ref.shape[dim], dim=dim)
        self.slices[key].kind = "param"
        owner = self.param_owner.get(ref.param)
        if fresh and guessed and owner is None:  # its first read may still place its channels
            self._bare_guess.add(id(atoms))
        if owner is not None:  # its pruner did not say how the tensor follows the module's slices
            why = f"{ref.param} is used outside its module {owner}, which a plugin claims"
            self.freeze(atoms, why)
            self.outside_reads.append((owner, ref.param[len(owner) + 1 :] if owner else ref.param, why))
            cross = None
        if cross is not None:  # fresh per read; a slice only once a matrix product contracts it
            self._bare_cross[id(cross[1])] = (ref.param, 0)
            self._cross.append((cross[1], ref.param))
        lab = Label(dim, atoms, cross=cross)
        self._labels[ref.key] = lab
        self._bare_atoms.add(id(atoms))
        return lab

    def regard_bare(self, ref: Any, lab: Label, dim: int) -> Label | None:
        """Move a bare tensor's guessed channel dimension (its last one longer than one) to
        ``dim``, where the channels it meets stand (a ``(C, H, W)`` or ``(1, C, H, W)``
        position embedding added to feature maps met the channels on another dimension and
        froze them before 2026-12-02): only on its first read, in the op that reads it, when
        no plugin named its dimension and it has no second label. ``None`` otherwise."""
        if id(lab.atoms) not in self._bare_guess or not isinstance(ref, TRef) or ref.param is None:
            return None
        spec = self.slices.get(("", ref.param))
        if spec is None or spec.atoms is not lab.atoms:
            return None
        atoms = self.new_atoms(ref.shape[dim])
        spec.atoms, spec.dim = atoms, dim
        new = Label(dim, atoms)
        self._labels[ref.key] = new
        self._bare_atoms.add(id(atoms))
        self._bare_guess.discard(id(lab.atoms))
        return new

    def is_bare(self, lab: Label) -> bool:
        """Whether ``lab`` is a bare tensor's own label (a parameter or buffer read outside
        any layer, its dimension not yet met by a layer's channels)."""
        return id(lab.atoms) in self._bare_atoms

    def readers(self, ref: Any) -> list[Any]:
        """The events of the recording that read the traced tensor ``ref`` (those later
        in the pass too), in order; the index is built on the first call."""
        if not isinstance(ref, TRef):
            return []
        if self._readers is None:
            self._readers = {}
            for event in self.events:
                for r in event.inputs:
                    self._readers.setdefault(r.key, []).append(event)
        return self._readers.get(ref.key, [])

    # -- bookkeeping used by the kernel ---------------------------------------
    def where(self) -> str:
        ev = self.event
        if ev is None:
            return "?"
        op = getattr(ev, "op", None)
        if op is not None:
            return f"op {op} in {ev.scope or 'model'}"
        return f"module {ev.name}"

    def scope_module(self) -> Any:
        """The module whose ``forward`` runs the op being traced (``None`` for a module
        call): a mapper may trust what that module's fix-up repairs."""
        return self.modules.get(getattr(self.event, "scope", None))

    def scope_numbers(self) -> set[int]:
        """The plain ints handed to the ``forward`` that runs the op being traced."""
        return self.call_numbers.get(getattr(self.event, "scope", None), set())

    def keeps_whole_heads(self) -> bool:
        """Whether the op being traced runs directly in an attention module whose heads
        must stay whole (the ``cleanai_whole_heads`` hook)."""
        return getattr(self.event, "scope", None) in self.whole_heads

    def begin(self, event: Any) -> None:
        self.event = event
        self._consumed = set()
        self._cross_used = set()
        self._bare_guess = set()

    def end(self, event: Any) -> None:
        """Freeze labelled inputs the handler never looked at, and the second labelled
        dimension of an input that the handler neither contracted nor passed on."""
        for ref in event.outputs:
            self.made_by[ref.key] = event
        if self.unbinds.tags:
            self.unbinds.carry(event, self)
        if self.statistics.pending:
            self.statistics.escape(event, self)
        for ref in event.inputs:
            lab = self._labels.get(ref.key)
            if lab is None:
                continue
            if ref.key not in self._consumed:
                self.freeze(lab.atoms, f"channels reach {self.where()}, which ignored them")
            if lab.cross is not None and id(lab.cross[1]) not in self._cross_used:
                self._cross_met.add(id(lab.cross[1]))
                self.freeze(lab.cross[1], f"a second labelled dimension reaches {self.where()}, which ignored it")

    @property
    def unions(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._unions

    @property
    def frozen(self) -> list[tuple[torch.Tensor, str]]:
        return self._frozen
