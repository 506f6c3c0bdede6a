"""The request's options, declared once.

Every field of a cross_entropy request is one `Option` below: its name, wire kind, default and
documentation, and where it goes (the engine call, the coalescing key). Everything else is derived
from `OPTIONS`: msgpack and JSON parsing (`parse_request`), the client's message
(`request_message`), the engine's keyword arguments (`engine_kwargs`), the batch key
(`shared_values`) and, in the server, the OpenAPI model. Adding an option is one declaration
here plus its math in the server.

The fused linear cross-entropy's messages are declared the same way (`LINEAR_OPTIONS`,
`WEIGHT_PUT_OPTIONS`, `WEIGHT_GRAD_OPTIONS`), taking the loss request's options that apply by
name, and are parsed by the same `parse_fields`.

Only wire types are checked here; values (reduction names, index ranges...) are the server's
semantics, checked with PyTorch's messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .protocol import (
    INT64_MAX,
    INT64_MIN,
    PROTOCOL_VERSION,
    SPECIAL_FLOATS,
    ProtocolError,
    RefusedArgument,
    WireTensor,
    decode_tensor,
    kind_of,
    special_float,
    tensor_from_json,
)
from .reduction import REDUCE_BLOCK_ROWS
from .shm import is_ref_map, parse_ref

__all__ = ["Option", "OPTIONS", "OPTION_BY_NAME", "OPTION_NAMES", "REQUIRED", "LINEAR_OPTIONS", "WEIGHT_PUT_OPTIONS",
           "WEIGHT_GRAD_OPTIONS", "parse_fields", "parse_request", "request_message", "engine_kwargs",
           "shared_values", "coalescing_key", "options_doc"]

_KINDS = ("tensor", "int", "float", "bool", "str")

@dataclass(frozen=True)
class Option:
    """One request field."""

    name: str
    kind: str                          # tensor | int | float | bool | str
    default: Any = None
    doc: str = ""
    required: bool = False
    nullable: bool = False             # nil (None) is a valid value
    choices: tuple[str, ...] | None = None   # for str options (documentation and the OpenAPI enum)
    ge: float | None = None            # bounds, for the OpenAPI model (the server checks values)
    gt: float | None = None
    le: float | None = None
    engine: bool = True                # passed to the loss engine
    shared: bool = False               # requests coalesced into one launch must agree on it
    json_dtype: str | None = "float32"  # a tensor given as a bare JSON list: its dtype (None: infer)
    example: Any = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"option {self.name}: unknown kind {self.kind!r}")


OPTIONS: tuple[Option, ...] = (
    # input first: senders put it first so a receiver can align it (see first_data_offset)
    Option("input", "tensor", required=True, example=[[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]],
           doc="logits (C), (N, C) or (N, C, d1, ..., dk); a bare nested list is float32"),
    Option("target", "tensor", required=True, json_dtype=None, example=[0, 2],
           doc="class indices (), (N) or (N, d1, ..., dk), or probabilities shaped like input; "
               "bare ints are int64"),
    Option("weight", "tensor", nullable=True, shared=True, doc="class weights (C)"),
    Option("ignore_index", "int", -100, doc="target value that is ignored"),
    Option("reduction", "str", "mean", choices=("mean", "sum", "none"), doc="mean, sum or none"),
    Option("label_smoothing", "float", 0.0, ge=0.0, le=1.0, shared=True,
           doc="label smoothing in [0, 1]"),
    Option("return_grad", "bool", False, shared=True,
           doc="also return d loss / d input for grad_output = 1"),
    Option("grad_dtype", "str", None, nullable=True, choices=("float32", "float64", "float16", "bfloat16"),
           doc="dtype of the returned gradient (default: the input's)"),
    Option("return_lse", "bool", False, shared=True, doc="per-row log-sum-exp"),
    Option("return_argmax", "bool", False, shared=True,
           doc="per-row argmax, and accuracy for class targets"),
    Option("lse_square_scale", "float", 0.0, ge=0.0, shared=True,
           doc="z-loss coefficient (PaLM): adds c * lse^2 per row"),
    Option("return_z_loss", "bool", False, engine=False,
           doc="always answer z_loss, the z-loss part of loss (zeros at lse_square_scale 0), as Liger's "
               "return_z_loss; without it z_loss comes only with lse_square_scale > 0"),
    Option("softcap", "float", None, nullable=True, gt=0.0, shared=True,
           doc="Gemma soft-capping: logits -> cap * tanh(logits / cap)"),
    # Layout (clce_server/cross_entropy/layouts.py): rewritten into the plain (N, C) rows above before the engine
    # sees the request. Shared: a launch never mixes layouts (layout requests also run alone).
    Option("classes_last", "bool", False, engine=False, shared=True,
           doc="input is (..., C) with class-index target (...) or probabilities (..., C): the class "
               "dimension last, as language models produce logits; served as rows without a copy"),
    Option("shift", "int", 0, ge=0, engine=False, shared=True,
           doc="causal LM shift (implies classes_last): input (..., T, C) and target (..., T); position t "
               "of the input is scored against target t + shift, the last `shift` positions are dropped "
               "(zero gradient rows). 0 <= shift < T"),
    Option("deadline_ms", "float", None, nullable=True, gt=0.0, engine=False,
           doc="answer 504 if not done within this time"),
    # shared memory (docs/protocol.md): tensors may also be region references (msgpack only)
    Option("grad_region", "str", None, nullable=True, engine=False,
           doc="shared memory: write the gradient into this registered region (the answer's grad "
               "is then a reference to it)"),
    Option("grad_offset", "int", 0, ge=0, engine=False,
           doc="shared memory: byte offset of the gradient in grad_region"),
    # pipelining (docs/protocol.md): a big batch sent as row chunks, combined bit for bit
    Option("mean_denominator", "float", None, nullable=True, engine=False,
           doc="row chunks of a bigger batch: the whole batch's 'mean' normaliser (summed weights "
               "of its non-ignored targets; its rows for probability targets)"),
    Option("mean_rows", "int", None, nullable=True, ge=0, engine=False,
           doc="row chunks of a bigger batch: its non-ignored rows (z-loss 'mean', accuracy)"),
    Option("return_partials", "bool", False, engine=False,
           doc="also return partials: float64 (blocks, 3) sums of loss, z-loss and correct argmaxes "
               f"per block of {REDUCE_BLOCK_ROWS} rows, in order"),
)
OPTION_NAMES = frozenset(o.name for o in OPTIONS)
REQUIRED = frozenset(o.name for o in OPTIONS if o.required)
#: the options by name, for an operation that takes some of them (the fused linear cross-entropy)
OPTION_BY_NAME: Mapping[str, Option] = {o.name: o for o in OPTIONS}

# ---- the fused linear cross-entropy (docs/protocol.md, "Fused linear cross-entropy") ---------------

#: the loss request's options that mean the same in a linear cross-entropy request
LINEAR_LOSS_OPTIONS = ("ignore_index", "reduction", "label_smoothing", "lse_square_scale", "softcap", "shift",
                       "return_lse", "return_argmax")

#: POST /v1/linear_cross_entropy
LINEAR_OPTIONS: tuple[Option, ...] = (
    Option("hidden", "tensor", required=True, doc="hidden states (..., H)"),
    Option("target", "tensor", required=True, doc="class indices (...), the hidden states' rows"),
    Option("weight", "tensor", nullable=True, doc="the (V, H) weight, sent with the request (stateless)"),
    Option("bias", "tensor", nullable=True, doc="the (V,) bias, with `weight`"),
    Option("class_weight", "tensor", nullable=True, doc="class weights (V): cross_entropy's weight"),
    Option("grad_output", "tensor", nullable=True,
           doc="reduction 'none': the loss's per-row gradient, which the gradients are computed for"),
    Option("weight_name", "str", None, nullable=True, doc="a stored weight (PUT /v1/weights/{name})"),
    Option("weight_version", "str", None, nullable=True, doc="the stored weight's version"),
    Option("accumulate", "bool", False,
           doc="add the weight's and bias's gradients into the stored version's accumulators"),
    Option("want_grad", "bool", True, doc="compute the gradients"),
    *(OPTION_BY_NAME[name] for name in LINEAR_LOSS_OPTIONS),
    # shared memory: grad_region places the hidden's gradient, grad_weight_region the weight's
    OPTION_BY_NAME["grad_region"],
    OPTION_BY_NAME["grad_offset"],
    Option("grad_weight_region", "str", None, nullable=True,
           doc="shared memory: write the weight's gradient into this registered region"),
    Option("grad_weight_offset", "int", 0, ge=0, doc="shared memory: byte offset of the weight's gradient"),
)
#: PUT /v1/weights/{name}
WEIGHT_PUT_OPTIONS: tuple[Option, ...] = (
    Option("weight_version", "str", required=True, doc="the version stored (one per name)"),
    Option("weight", "tensor", required=True, doc="the (V, H) weight"),
    Option("bias", "tensor", nullable=True, doc="the (V,) bias"),
)
#: POST /v1/weights/{name}/grad
WEIGHT_GRAD_OPTIONS: tuple[Option, ...] = (
    Option("weight_version", "str", required=True, doc="the version whose accumulated gradient is taken"),
    LINEAR_OPTIONS[-2],
    LINEAR_OPTIONS[-1],
)


def _parse_value(opt: Option, value: Any, json: bool) -> Any:
    if value is None and opt.nullable:
        return None
    kind, name = opt.kind, opt.name
    if kind == "tensor":
        if json:
            return tensor_from_json(value, name=name, default_dtype=opt.json_dtype)
        if isinstance(value, WireTensor):
            return decode_tensor(value, name=name)
        if is_ref_map(value):   # resolved into an array by the server (region checks, tenant)
            return parse_ref(value, name=name)
        raise ProtocolError(f"{name}: expected a tensor, got {kind_of(value)}")
    if kind == "float":
        if type(value) in (int, float):
            try:
                return float(value)
            except OverflowError as exc:   # an int too big for a double: torch's refusal, too
                raise RefusedArgument(exc) from None
        if json and special_float(value):
            return SPECIAL_FLOATS[value]
        raise ProtocolError(f"{name}: expected a number, got {kind_of(value)}")
    expected = {"int": (int, "an integer"), "bool": (bool, "true or false"), "str": (str, "a string")}[kind]
    if type(value) is not expected[0]:
        raise ProtocolError(f"{name}: expected {expected[1]}, got {kind_of(value)}")
    if kind == "int" and not INT64_MIN <= value <= INT64_MAX:
        # msgpack carries uint64 and JSON any integer; torch holds int64 and says so
        raise RefusedArgument(ValueError("Overflow when unpacking long long"))
    return value


_SPECS: dict[int, tuple] = {}


def _spec(fields: tuple[Option, ...]) -> tuple[frozenset, tuple[str, ...], dict[str, Any]]:
    """The field names, the required ones and the defaults of a declaration (made once: a small
    request's parsing is on the CPU's critical path)."""
    spec = _SPECS.get(id(fields))
    if spec is None or spec[0] is not fields:
        spec = _SPECS[id(fields)] = (fields, frozenset(o.name for o in fields),
                                     tuple(o.name for o in fields if o.required), {o.name: o.default for o in fields})
    return spec[1:]


def parse_fields(msg: Any, fields: tuple[Option, ...], *, json: bool = False) -> dict[str, Any]:
    """Check a decoded message's fields and wire types against `fields` and fill in the defaults.

    Returns every field by name, tensors as numpy arrays (or region references). `json=True`
    reads tensors in the JSON form (see `tensor_from_json`)."""
    if not isinstance(msg, Mapping):
        raise ProtocolError("a request must be a map")
    names, required, defaults = _spec(fields)
    for key in msg:
        if key not in names and key != "v":
            raise ProtocolError(f"unknown request field {key!r}")
    missing = [name for name in required if name not in msg]
    if missing:
        raise ProtocolError(f"missing request field {missing[0]!r}")
    v = msg.get("v", PROTOCOL_VERSION)
    if type(v) is not int:
        raise ProtocolError(f"v: expected an integer, got {kind_of(v)}")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {v}; this server speaks version {PROTOCOL_VERSION}")
    out = dict(defaults)
    for o in fields:   # in declaration order: the first bad field named is the same whatever the message's order
        if o.name in msg:
            out[o.name] = _parse_value(o, msg[o.name], json)
    return out


def parse_request(msg: Any, *, json: bool = False) -> dict[str, Any]:
    """A cross_entropy request's options (`parse_fields` over `OPTIONS`)."""
    return parse_fields(msg, OPTIONS, json=json)


def request_message(values: Mapping[str, Any]) -> dict[str, Any]:
    """The wire message for option values (tensors already in wire form), in declaration order:
    input first, so a receiver can place the body to align it. Options left out take their
    defaults on the server."""
    unknown = [k for k in values if k not in OPTION_NAMES]
    if unknown:
        raise TypeError(f"cross_entropy() got an unexpected keyword argument {unknown[0]!r}")
    msg: dict[str, Any] = {}
    for o in OPTIONS:
        if o.name in values:
            msg[o.name] = values[o.name]
        if o.name == "input":
            msg["v"] = PROTOCOL_VERSION
    return msg


def engine_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    """The loss engine's keyword arguments from parsed options."""
    return {o.name: args[o.name] for o in OPTIONS if o.engine}


def shared_values(args: Mapping[str, Any]) -> tuple:
    """What requests sharing one launch must agree on, from the options marked `shared`
    (tensors by dtype and bytes; options a request leaves out take their defaults)."""
    out = []
    for o in OPTIONS:
        if not o.shared:
            continue
        value = args.get(o.name, o.default)
        if o.kind == "tensor" and value is not None:
            value = (value.dtype.str, value.shape, value.tobytes())
        out.append(value)
    return tuple(out)


def options_doc(skip: tuple[str, ...] = ("input", "target")) -> str:
    """One line per option, for docstrings."""
    lines = []
    for o in OPTIONS:
        if o.name in skip:
            continue
        lines.append(f"{o.name} (default {o.default!r}): {o.doc}")
    return "\n".join(lines)


# ---- coalescing: who may share one launch -----------------------------------------------------

#: weights of more classes than this are not worth comparing byte for byte to coalesce
_BATCH_MAX_WEIGHT = 4096


def coalescing_key(args: Mapping[str, Any], max_elements: int | None = None) -> tuple | None:
    """What requests sharing one launch must agree on, or None when this one runs alone: the
    shape of the work (classes, the input's and the target's exact dtypes, hard or soft targets)
    and every option declared `shared`. Equal keys mean equal kernel scalars once validated (the
    compute dtype follows from the dtypes), so the scheduler's batches are the engine's launches.
    `max_elements`: bigger inputs run alone (None: no bound)."""
    x, w, t = args["input"], args.get("weight"), args["target"]
    if not (x.ndim == 2 and 0 < x.size and (max_elements is None or x.size <= max_elements)
            and not args.get("lse_square_scale") and (w is None or w.size <= _BATCH_MAX_WEIGHT)):
        return None
    return (x.shape[1], x.dtype.str, t.dtype.str, t.shape == x.shape, *shared_values(args))
