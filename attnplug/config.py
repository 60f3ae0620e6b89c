"""``TransformerConfig``: every setting of a model, validated where it is made.

Field names are Megatron-Core's where Megatron has one. Every bad value raises
:class:`ConfigError` (a ``ValueError``) naming the field, the value and what is accepted.
"""

from __future__ import annotations

import difflib
import math
import tomllib
import warnings
from pathlib import Path
from typing import Any, ClassVar, Self

import attrs

from attnplug._errors import ConfigError
from attnplug._grammar import quote

__all__ = ["TransformerConfig", "ConfigError", "VARIANTS", "ACTIVATIONS", "NORMALIZATIONS"]

VARIANTS = (None, "gdn", "dsa")
_DEPRECATED_VARIANTS = {"gated_delta_net": "gdn"}
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "silu", "relu", "squared_relu")
DTYPES = ("float32", "bfloat16", "float16", "float64")
KITCHEN_ATTENTION_BACKENDS = ("sdpa", "fa")
KITCHEN_RECIPES = ("bf16", "fp8_current")
ROUTER_LOAD_BALANCING = ("aux_loss", "none")


def _fail(field: str, value: Any, accepted: str) -> ConfigError:
    return ConfigError(f"{field}={value!r} is not accepted: expected {accepted}")


def _int(field: str, value: Any, *, minimum: int = 1, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an integer" + (" or None" if optional else "")
        raise _fail(field, value, f"{kind} >= {minimum}")
    if value < minimum:
        raise _fail(field, value, f"an integer >= {minimum}" + (" or None" if optional else ""))


def _float(field: str, value: Any, *, minimum: float = 0.0, strict: bool = False,
           optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _fail(field, value, "a number" + (" or None" if optional else ""))
    if value < minimum or (strict and value == minimum) or math.isinf(value):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise _fail(field, value, f"a finite number {bound}")


def _bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(field, value, "true or false")


def _choice(field: str, value: Any, choices: tuple) -> None:
    if value not in choices or isinstance(value, bool):
        raise _fail(field, value, "one of " + ", ".join(repr(c) for c in choices))


def _normalize_variant(value: Any) -> Any:
    if value in _DEPRECATED_VARIANTS:
        new = _DEPRECATED_VARIANTS[value]
        warnings.warn(
            f"experimental_attention_variant={value!r} is deprecated; use {new!r}",
            DeprecationWarning,
            stacklevel=4,
        )
        return new
    return value


def _pattern_converter(field: str):
    def convert(value: Any) -> Any:
        if isinstance(value, str):
            from attnplug.patterns import parse_pattern_field

            value = parse_pattern_field(field, value)
        if isinstance(value, list):
            return tuple(value)
        return value

    return convert


@attrs.frozen(kw_only=True)
class TransformerConfig:
    """The settings of a hybrid transformer (Megatron-Core's names where it has them).

    Derived defaults: ``num_query_groups`` = ``num_attention_heads``, ``kv_channels`` =
    ``hidden_size // num_attention_heads``, ``ffn_hidden_size`` = ``4 * hidden_size``,
    ``moe_ffn_hidden_size`` = ``ffn_hidden_size``. Pattern fields (``linear_attention_freq``,
    ``moe_layer_freq``) take an int, a list of 0/1 or the string form ``"([1]*3+[0])*2"``.
    Use ``attrs.evolve(config, field=value)`` for a changed copy; it is validated again.

    A stack is described one of two ways:

    * *frequency form*: ``num_layers`` transformer layers, each a mixer and an MLP, chosen by
      ``experimental_attention_variant``, ``linear_attention_freq``, ``moe_layer_freq`` and
      ``num_moe_experts`` (Megatron's GPTModel);
    * *pattern form*: ``hybrid_layer_pattern``, one symbol per sublayer (Megatron's
      HybridModel): ``"(G-G-G-*E)*6"``, ``|`` between pipeline stages. Each sublayer is a
      mixer-only or an MLP-only layer with its own norm and residual. The pattern replaces
      ``experimental_attention_variant``, ``linear_attention_freq`` and ``moe_layer_freq``:
      setting any of them (``moe_layer_freq`` to anything but its default 1) as well is an error.
      The size fields stay and are checked when the pattern uses them: ``linear_*`` for ``G``,
      ``dsa_indexer_*`` for ``D``, ``num_moe_experts`` (required) and ``moe_*`` for ``E``.
      ``num_layers`` counts sublayers: leave it out and it is derived from the pattern; given,
      it must equal the number of sublayers.
    """

    # -- sizes --------------------------------------------------------------------------------
    num_layers: int | None = None  # an int after construction (derived from the pattern form)
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None
    kv_channels: int | None = None
    ffn_hidden_size: int | None = None
    # -- layer details ------------------------------------------------------------------------
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    activation_func: str = "silu"
    gated_linear_unit: bool = True
    add_bias_linear: bool = False
    qk_layernorm: bool = False
    attention_output_gate: bool = False
    position_embedding_type: str = "rope"
    rotary_percent: float = 1.0
    rotary_base: float = 10000.0
    init_method_std: float = 0.02
    params_dtype: str = "float32"
    # -- experimental attention variants ------------------------------------------------------
    hybrid_layer_pattern: str | None = None
    experimental_attention_variant: str | None = attrs.field(
        default=None, converter=_normalize_variant
    )
    linear_attention_freq: Any = attrs.field(
        default=None, converter=_pattern_converter("linear_attention_freq")
    )
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    dsa_indexer_n_heads: int | None = None
    dsa_indexer_head_dim: int | None = None
    dsa_indexer_topk: int | None = None
    dsa_indexer_loss_coeff: float | None = None
    dsa_indexer_rope_head_dim: int | None = None
    # -- mixture of experts -------------------------------------------------------------------
    moe_layer_freq: Any = attrs.field(default=1, converter=_pattern_converter("moe_layer_freq"))
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_router_pre_softmax: bool = False
    moe_router_load_balancing_type: str = "aux_loss"
    moe_aux_loss_coeff: float = 0.01
    moe_shared_expert_intermediate_size: int | None = None
    moe_grouped_gemm: bool = False
    # -- pipeline slicing ---------------------------------------------------------------------
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False
    pipeline_model_parallel_layout: str | None = None
    # -- backends -----------------------------------------------------------------------------
    use_kitchen: bool = False
    use_kitchen_attention: bool = False
    kitchen_attention_backend: str = "sdpa"
    kitchen_fallback_backend: str = "te"
    kitchen_recipe: str = "bf16"
    backend: str = "auto"

    def __attrs_post_init__(self) -> None:
        self._resolve_num_layers()
        self._validate_sizes()
        self._validate_layer_details()
        self._validate_variant()
        self._validate_moe()
        self._validate_backend()
        self._validate_pipeline_fields()
        from attnplug.pipeline import check_pipeline

        check_pipeline(self)

    # -- derived values -------------------------------------------------------------------------
    @property
    def residual_branches(self) -> int:
        """How many residual branches add into the hidden stream: two per layer (mixer and
        MLP) in the frequency form, one per sublayer in the pattern form. Projections that
        feed the residual are initialised with ``init_method_std / sqrt(residual_branches)``
        (Megatron's ``2 * num_layers``, and its HybridModel's ``num_layers``)."""
        return self.num_layers if self.hybrid_layer_pattern is not None else 2 * self.num_layers

    @property
    def query_groups(self) -> int:
        """``num_query_groups``, or ``num_attention_heads`` when unset."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """``kv_channels``, or ``hidden_size // num_attention_heads`` when unset."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """``ffn_hidden_size``, or ``4 * hidden_size`` when unset."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def moe_ffn_size(self) -> int:
        """``moe_ffn_hidden_size``, or the dense FFN size when unset."""
        return self.moe_ffn_hidden_size or self.ffn_size

    @property
    def indexer_rope_dim(self) -> int:
        """How many leading dims of each DSA indexer head get RoPE."""
        if self.dsa_indexer_rope_head_dim is not None:
            return self.dsa_indexer_rope_head_dim
        if self.position_embedding_type != "rope":
            return 0
        return min(64, self.dsa_indexer_head_dim or 0)

    @property
    def torch_dtype(self):
        """``params_dtype`` as a ``torch.dtype``."""
        import torch

        return getattr(torch, self.params_dtype)

    # -- validation -----------------------------------------------------------------------------
    def _validate_sizes(self) -> None:
        _int("num_layers", self.num_layers)
        _int("hidden_size", self.hidden_size)
        _int("num_attention_heads", self.num_attention_heads)
        _int("num_query_groups", self.num_query_groups, optional=True)
        _int("kv_channels", self.kv_channels, optional=True)
        _int("ffn_hidden_size", self.ffn_hidden_size, optional=True)
        if self.num_attention_heads % self.query_groups:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                f"{self.num_attention_heads}: set kv_channels explicitly or change the sizes"
            )

    def _validate_layer_details(self) -> None:
        _choice("normalization", self.normalization, NORMALIZATIONS)
        _float("layernorm_epsilon", self.layernorm_epsilon, strict=True)
        _choice("activation_func", self.activation_func, ACTIVATIONS)
        for name in ("gated_linear_unit", "add_bias_linear", "qk_layernorm",
                     "attention_output_gate", "moe_router_pre_softmax", "moe_grouped_gemm",
                     "account_for_embedding_in_pipeline_split",
                     "account_for_loss_in_pipeline_split", "use_kitchen",
                     "use_kitchen_attention"):
            _bool(name, getattr(self, name))
        _choice("position_embedding_type", self.position_embedding_type, ("rope", "none"))
        _float("rotary_percent", self.rotary_percent, strict=True)
        if self.rotary_percent > 1:
            raise _fail("rotary_percent", self.rotary_percent, "a fraction in (0, 1]")
        if self.position_embedding_type == "rope" and int(self.head_dim * self.rotary_percent) % 2:
            raise ConfigError(
                f"rotary_percent={self.rotary_percent} gives "
                f"{self.head_dim * self.rotary_percent:g} rotary dims of head_dim={self.head_dim}: "
                "expected an even whole number"
            )
        _float("rotary_base", self.rotary_base, strict=True)
        _float("init_method_std", self.init_method_std)
        _choice("params_dtype", self.params_dtype, DTYPES)

    def _resolve_num_layers(self) -> None:
        """Check ``hybrid_layer_pattern`` against the fields it replaces and derive
        ``num_layers`` from it when left out (a frozen class sets it once, here)."""
        text = self.hybrid_layer_pattern
        if text is None:
            if self.num_layers is None:
                raise ConfigError(
                    "num_layers=None is not accepted: expected an integer >= 1 (it may be left "
                    "out only with hybrid_layer_pattern, which gives the sublayers)"
                )
            return
        from attnplug.patterns import from_hybrid_pattern

        count = len(from_hybrid_pattern(text))
        self._check_replaced_fields()
        if self.num_layers is None:
            object.__setattr__(self, "num_layers", count)
            return
        _int("num_layers", self.num_layers)
        if self.num_layers != count:
            raise ConfigError(
                f"num_layers={self.num_layers} is not accepted with hybrid_layer_pattern="
                f"{quote(text)}: the pattern has {count} sublayers (one per symbol); expected "
                f"num_layers={count}, or leave num_layers out to derive it"
            )

    def _check_replaced_fields(self) -> None:
        replaced = (
            ("experimental_attention_variant", self.experimental_attention_variant, None,
             "which mixer each sublayer has"),
            ("linear_attention_freq", self.linear_attention_freq, None,
             "which sublayers are Gated DeltaNet ('G')"),
            ("moe_layer_freq", self.moe_layer_freq, 1, "which sublayers are MoE ('E')"),
        )
        for field, value, default, decides in replaced:
            if value is None and default is None:
                continue
            if isinstance(value, bool) or value != default:
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(
                    f"{field}={quote(shown)} is not accepted together with hybrid_layer_pattern="
                    f"{quote(self.hybrid_layer_pattern)}: the pattern's symbols decide {decides}; "
                    f"leave {field} at its default {default!r}"
                )

    def _validate_variant(self) -> None:
        from attnplug.patterns import check_pattern

        _choice(
            "experimental_attention_variant",
            self.experimental_attention_variant,
            VARIANTS + tuple(_DEPRECATED_VARIANTS),
        )
        if self.linear_attention_freq is not None:
            check_pattern("linear_attention_freq", self.linear_attention_freq, self.num_layers)
        variant = self.experimental_attention_variant
        if variant == "gdn":
            if self.linear_attention_freq is None:
                raise ConfigError(
                    "linear_attention_freq=None is not accepted with "
                    "experimental_attention_variant='gdn': expected an int N (softmax attention "
                    "every N-th layer, 1 = none), a list of 0/1 per layer or a pattern string"
                )
            self._validate_gdn_sizes()
        if variant == "dsa":
            self._validate_dsa_fields("with experimental_attention_variant='dsa'")
        self._validate_pattern_sizes()

    def _validate_pattern_sizes(self) -> None:
        """The size fields the symbols of ``hybrid_layer_pattern`` need, checked."""
        text = self.hybrid_layer_pattern
        if text is None:
            return
        from attnplug.patterns import _first_column

        def uses(symbol: str, what: str) -> str | None:
            column = _first_column(text, symbol)
            if not column:
                return None
            return (f"with hybrid_layer_pattern={quote(text)}, which has {what} sublayers "
                    f"{symbol!r} (the first at column {column})")

        if uses("G", "Gated DeltaNet"):
            self._validate_gdn_sizes()
        if context := uses("D", "DSA"):
            self._validate_dsa_fields(context)
        if (context := uses("E", "MoE")) and self.num_moe_experts is None:
            raise ConfigError(f"num_moe_experts=None is not accepted {context}: expected an "
                              "integer >= 1")

    def _validate_gdn_sizes(self) -> None:
        for name in ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                     "linear_num_key_heads", "linear_num_value_heads"):
            _int(name, getattr(self, name))
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                f"linear_num_value_heads={self.linear_num_value_heads} must be a multiple of "
                f"linear_num_key_heads={self.linear_num_key_heads}"
            )

    def _validate_dsa_fields(self, context: str) -> None:
        for name in ("dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk"):
            value = getattr(self, name)
            if value is None:
                raise ConfigError(f"{name}=None is not accepted {context}: expected an integer "
                                  ">= 1")
            _int(name, value)
        _float("dsa_indexer_loss_coeff", self.dsa_indexer_loss_coeff, optional=True)
        _int("dsa_indexer_rope_head_dim", self.dsa_indexer_rope_head_dim, minimum=0,
             optional=True)
        if self.indexer_rope_dim > self.dsa_indexer_head_dim or self.indexer_rope_dim % 2:
            raise _fail("dsa_indexer_rope_head_dim", self.dsa_indexer_rope_head_dim,
                        f"an even number <= dsa_indexer_head_dim={self.dsa_indexer_head_dim}")

    def _validate_moe(self) -> None:
        from attnplug.patterns import check_pattern

        _int("num_moe_experts", self.num_moe_experts, optional=True)
        _int("moe_router_topk", self.moe_router_topk)
        _int("moe_ffn_hidden_size", self.moe_ffn_hidden_size, optional=True)
        _int("moe_shared_expert_intermediate_size", self.moe_shared_expert_intermediate_size,
             optional=True)
        _float("moe_aux_loss_coeff", self.moe_aux_loss_coeff)
        _choice("moe_router_load_balancing_type", self.moe_router_load_balancing_type,
                ROUTER_LOAD_BALANCING)
        check_pattern("moe_layer_freq", self.moe_layer_freq, self.num_layers)
        if self.num_moe_experts is not None and self.moe_router_topk > self.num_moe_experts:
            raise ConfigError(
                f"moe_router_topk={self.moe_router_topk} is not accepted: expected at most "
                f"num_moe_experts={self.num_moe_experts}"
            )

    def _validate_pipeline_fields(self) -> None:
        _int("pipeline_model_parallel_size", self.pipeline_model_parallel_size)
        _int("virtual_pipeline_model_parallel_size", self.virtual_pipeline_model_parallel_size,
             optional=True)
        _int("num_layers_in_first_pipeline_stage", self.num_layers_in_first_pipeline_stage,
             optional=True)
        _int("num_layers_in_last_pipeline_stage", self.num_layers_in_last_pipeline_stage,
             optional=True)
        layout = self.pipeline_model_parallel_layout
        if layout is not None and (not isinstance(layout, str) or not layout.strip()):
            raise _fail("pipeline_model_parallel_layout", layout,
                        "None or a layout string such as 'Et|tt|tL'")

    def _validate_backend(self) -> None:
        _choice("kitchen_attention_backend", self.kitchen_attention_backend,
                KITCHEN_ATTENTION_BACKENDS)
        _choice("kitchen_recipe", self.kitchen_recipe, KITCHEN_RECIPES)
        if not isinstance(self.kitchen_fallback_backend, str) or not self.kitchen_fallback_backend:
            raise _fail("kitchen_fallback_backend", self.kitchen_fallback_backend,
                        "the name of an installed backend, such as 'te' or 'local'")
        if self.kitchen_fallback_backend == "kitchen":
            raise _fail("kitchen_fallback_backend", "kitchen",
                        "another backend than kitchen itself, such as 'te' or 'local'")
        if not isinstance(self.backend, str) or not self.backend:
            raise _fail("backend", self.backend, "'auto' or the name of an installed backend")
        if self.use_kitchen_attention and not self.use_kitchen and self.backend != "kitchen":
            raise ConfigError(
                "use_kitchen_attention=true needs the kitchen backend: set use_kitchen=true or "
                "backend='kitchen'"
            )

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        """The names of every field, in declaration order."""
        return [a.name for a in attrs.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TransformerConfig:
        """Build a config from a mapping; unknown keys raise ``ConfigError`` with a did-you-mean."""
        check_table(cls, values, source, "TransformerConfig")
        missing = [a.name for a in attrs.fields(cls)
                   if a.default is attrs.NOTHING and a.name not in values]
        if values.get("num_layers") is None and values.get("hybrid_layer_pattern") is None:
            missing.insert(0, "num_layers (or hybrid_layer_pattern)")
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> TransformerConfig:
        """Read the ``[model]`` table of a TOML file.

        Raises ``ConfigError`` for a missing file, bad TOML, a missing ``[model]`` table or any
        bad field.
        """
        return cls.from_dict(read_toml_table(path, "model"), source=f"{path} [model]")

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (lists for patterns), suitable for TOML or JSON."""
        out = attrs.asdict(self, recurse=False)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


class TomlTable:
    """What the attrs classes of one optional TOML table (``[train]``, ``[parallel]``) share;
    ``TABLE`` names the table."""

    TABLE: ClassVar[str]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str | None = None) -> Self:
        """Build from a mapping; an unknown key raises ``ConfigError`` with a did-you-mean
        (``source`` starts the message; default ``[TABLE]``)."""
        check_table(cls, values, source or f"[{cls.TABLE}]", f"[{cls.TABLE}]")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> Self:
        """The ``[TABLE]`` table of a TOML file (all defaults when the file has none).

        Raises:
            ConfigError: a missing or malformed file, an unknown key or a bad value.
        """
        table = read_toml(path).get(cls.TABLE, {})
        return cls.from_dict(table, source=f"{path} [{cls.TABLE}]")

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values, suitable for TOML, JSON or a checkpoint."""
        return attrs.asdict(self)


def check_table(cls: type, values: Any, source: str, what: str) -> None:
    """Raise ``ConfigError`` unless ``values`` is a mapping whose keys are all fields of the
    attrs class ``cls`` (an unknown key gets a did-you-mean). ``source`` starts the message;
    ``what`` names the kind of table."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a table of {what} fields")
    known = [a.name for a in attrs.fields(cls)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown field {key!r}{hint}")


def parse_override(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` (a ``--set`` option) as ``(field, value)``: the value as TOML (numbers,
    booleans, lists, quoted strings), else the bare text as a string. ``ConfigError`` when there
    is no ``=`` or no field name."""
    field, eq, value = text.partition("=")
    if not eq or not field.strip():
        raise ConfigError(f"--set {text!r}: expected FIELD=VALUE")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word: the string
    return field.strip(), parsed


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; raise ``ConfigError`` naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


def read_toml_table(path: str | Path, table: str) -> dict[str, Any]:
    """The table ``[table]`` of a TOML file (``ConfigError`` when it is missing)."""
    data = read_toml(path)
    if table not in data:
        raise ConfigError(f"config file {str(path)!r} has no [{table}] table")
    if not isinstance(data[table], dict):
        raise ConfigError(f"config file {str(path)!r}: [{table}] must be a table")
    return data[table]
