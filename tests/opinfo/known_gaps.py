"""The one table of known gaps: OpInfo samples lazygraph does not get right yet, each with its reason.

Key: (op name, variant_test_name, dtype or '*', 'forward' | 'backward'). An entry is a strict
expected failure: at least one sample of that key must fail the way it says ('raises' or
'wrong'), or the sweep reports the entry stale and fails. Every failing sample must be listed.
The goal is a table that holds only raises, each one eager's own exception or an explained gap.

`pending` names the issue section another branch is fixing it in: those entries are expected to go
stale when that branch lands, and are then deleted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gap:
    kind: str  # 'raises' | 'wrong'
    reason: str
    pending: str = ""  # e.g. "issue 9 §5": being fixed on another branch


def raises(reason: str, pending: str = "") -> Gap:
    return Gap("raises", reason, pending)


def wrong(reason: str, pending: str = "") -> Gap:
    return Gap("wrong", reason, pending)


# Named in issue 9 (its "Bugs named above"), fixed on other branches: these entries go stale then.
PENDING = "issue 9: named bug, fixed on another branch"
PENDING_STRIDES = "issue 9 §3: real strides"

ZERO_DIM_MIX = ("a 0-dim operand mixed with a larger one: the extern fallback returns the wrong shape "
                "(eager broadcasts)")
ZERO_DIM_DIM = "a 0-dim input or index with dim=0/-1: the lowering indexes a dimension that does not exist"
ZERO_DIM_INDEX = "argmax/argmin (max/min with a dim) of a 0-dim tensor give the value, not index 0"
ARGMAX_BOOL = "argmax/argmin of a bool tensor (max/min with a dim, cumprod's backward) raises; eager works"
FILL = "a float fill value other than 0, ±0.5, ±1, 2, 3: 'ScalarValue' object has no attribute '_version'"
COPY_TO = "the diagonal family's backward needs aten.copy_to, which lazygraph does not have"
RNG_0DIM = "a random op on a 0-dim tensor fails inside the Triton kernel"
ADAPTIVE_MAX_POOL = "adaptive_max_pool with non-divisible sizes: a decomposition's NotImplemented is passed on"
SPARSE_BACKWARD = "sparse CSR backward through the extern fallback (segfaults the process, or 'no strides')"
BOOL_ADD = "bool + bool is XOR in the Triton kernel (eager: logical or)"
COMPLEX = "torch.complex / torch.polar return zeros (and polar's backward raises)"
DIV_TRUNC = "div(rounding_mode='trunc') on floats does not truncate (fmod's gradient inherits it)"
AS_STRIDED = "as_strided on a view ignores the view's storage offset"
DROPOUT_BACKWARD_DTYPE = "native_dropout_backward of an integer or bool grad keeps its dtype (eager: float32)"
LAYER_NORM_STATS = "native_layer_norm of bf16/fp16: mean and rstd come back float32 (eager: the input dtype)"
EMBEDDING_BAG_BACKWARD = "strided indices reach torch's embedding_bag backward, which needs them contiguous"
EMBEDDING_BAG = "embedding_bag reads strided (non-contiguous) indices as contiguous"

# Found by this sweep, not named in issue 9.
HALF_RANGE = "arange / linspace in bfloat16 give NaN and denormals (integer bits read as bf16?)"
BATCH_NORM_LEGIT = "_native_batch_norm_legit without running stats calls the no_stats overload with 8 arguments"
CONJ_VIEW_AS_REAL = "the backward runs view_as_real on a conjugated complex tensor in the extern executor"
GEOMETRIC = "geometric_ in lazy mode returns all ones (eager: a geometric distribution)"
EIG_BACKWARD = ("the abs() OpInfo applies to linalg.eig's complex outputs cannot be differentiated on the "
                "lazy outputs")
RESIZE = "resize_ to more elements records an expand that the IR verifier rejects"
TENSOR_SPLIT = "tensor_split with a tensor of split indices: torch reads its data while it is still lazy"

GAPS: dict[tuple[str, str, str, str], Gap] = {
    ('__radd__', '', '*', 'forward'): wrong(BOOL_ADD, PENDING),
    ('_native_batch_norm_legit', '', '*', 'backward'): raises(BATCH_NORM_LEGIT),
    ('_native_batch_norm_legit', '', '*', 'forward'): raises(BATCH_NORM_LEGIT),
    ('add', '', '*', 'forward'): wrong(BOOL_ADD, PENDING),
    ('amax', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('amax', '', '*', 'forward'): raises(ZERO_DIM_DIM, PENDING),
    ('amin', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('amin', '', '*', 'forward'): raises(ZERO_DIM_DIM, PENDING),
    ('aminmax', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('aminmax', '', '*', 'forward'): raises(ZERO_DIM_DIM, PENDING),
    ('arange', '', '*', 'forward'): wrong(HALF_RANGE),
    ('argmax', '', '*', 'forward'): wrong(ZERO_DIM_INDEX, PENDING),
    ('argmin', '', '*', 'forward'): wrong(ZERO_DIM_INDEX, PENDING),
    ('as_strided', 'partial_views', '*', 'backward'): wrong(AS_STRIDED, PENDING),
    ('as_strided', 'partial_views', '*', 'forward'): wrong(AS_STRIDED, PENDING),
    ('atan2', '', '*', 'backward'): raises(ZERO_DIM_MIX, PENDING),
    ('atan2', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('bernoulli', '', '*', 'forward'): raises(RNG_0DIM, PENDING),
    ('bitwise_left_shift', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('bitwise_right_shift', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('complex', '', '*', 'forward'): wrong(COMPLEX, PENDING),
    ('copysign', '', '*', 'backward'): raises(ZERO_DIM_MIX, PENDING),
    ('copysign', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('corrcoef', '', '*', 'backward'): raises(COPY_TO, PENDING),
    ('cumprod', '', '*', 'backward'): raises(ARGMAX_BOOL, PENDING),
    ('diag', '', '*', 'backward'): raises(COPY_TO, PENDING),
    ('diagonal', '', '*', 'backward'): raises(COPY_TO, PENDING),
    ('diagonal_copy', '', '*', 'backward'): raises(COPY_TO, PENDING),
    ('diagonal_scatter', '', '*', 'backward'): raises(COPY_TO, PENDING),
    ('diagonal_scatter', '', '*', 'forward'): raises(COPY_TO, PENDING),
    ('div', 'trunc_rounding', '*', 'forward'): wrong(DIV_TRUNC, PENDING),
    ('fft.hfft', '', '*', 'backward'): raises(CONJ_VIEW_AS_REAL),
    ('fft.hfft2', '', '*', 'backward'): raises(CONJ_VIEW_AS_REAL),
    ('fft.hfftn', '', '*', 'backward'): raises(CONJ_VIEW_AS_REAL),
    ('fmax', '', '*', 'backward'): raises(ZERO_DIM_MIX, PENDING),
    ('fmax', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('fmin', '', '*', 'backward'): raises(ZERO_DIM_MIX, PENDING),
    ('fmin', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('fmod', '', '*', 'backward'): wrong(DIV_TRUNC, PENDING),
    ('fmod', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('full', '', '*', 'forward'): raises(FILL, PENDING),
    ('full_like', '', '*', 'forward'): raises(FILL, PENDING),
    ('gcd', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('geometric', '', '*', 'forward'): wrong(GEOMETRIC),
    ('hypot', '', '*', 'backward'): raises(ZERO_DIM_MIX, PENDING),
    ('hypot', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('igamma', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('igammac', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('index_add', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('index_copy', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('index_fill', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('index_reduce', 'amax', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('index_reduce', 'amin', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('index_reduce', 'mean', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('index_reduce', 'prod', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('index_select', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('index_select', '', '*', 'forward'): raises(ZERO_DIM_DIM, PENDING),
    ('lcm', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('linalg.diagonal', '', '*', 'backward'): raises(COPY_TO, PENDING),
    ('linalg.eig', '', '*', 'backward'): raises(EIG_BACKWARD),
    ('linalg.eigh', '', '*', 'backward'): raises(COPY_TO, PENDING),
    ('linalg.vander', '', '*', 'backward'): raises(ARGMAX_BOOL, PENDING),
    ('linspace', 'tensor_overload', '*', 'forward'): wrong(HALF_RANGE),
    ('logsumexp', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('logsumexp', '', '*', 'forward'): raises(ZERO_DIM_DIM, PENDING),
    ('masked.amax', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('masked.amax', '', '*', 'forward'): raises(ZERO_DIM_DIM, PENDING),
    ('masked.amin', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('masked.amin', '', '*', 'forward'): raises(ZERO_DIM_DIM, PENDING),
    ('masked.argmax', '', '*', 'forward'): wrong(ZERO_DIM_INDEX, PENDING),
    ('masked.argmin', '', '*', 'forward'): wrong(ZERO_DIM_INDEX, PENDING),
    ('masked.cumprod', '', '*', 'backward'): raises(ARGMAX_BOOL, PENDING),
    ('masked.logsumexp', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('masked.logsumexp', '', '*', 'forward'): raises(ZERO_DIM_DIM, PENDING),
    ('max', 'reduction_with_dim', '*', 'backward'): raises(ZERO_DIM_INDEX, PENDING),
    ('max', 'reduction_with_dim', '*', 'forward'): wrong(ZERO_DIM_INDEX, PENDING),
    ('mean', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('mean', '', '*', 'forward'): raises(ZERO_DIM_DIM, PENDING),
    ('min', 'reduction_with_dim', '*', 'backward'): raises(ZERO_DIM_INDEX, PENDING),
    ('min', 'reduction_with_dim', '*', 'forward'): wrong(ZERO_DIM_INDEX, PENDING),
    ('native_dropout_backward', '', '*', 'forward'): wrong(DROPOUT_BACKWARD_DTYPE, PENDING),
    ('native_layer_norm', '', '*', 'forward'): wrong(LAYER_NORM_STATS, PENDING),
    ('new_full', '', '*', 'forward'): raises(FILL, PENDING),
    ('nextafter', '', '*', 'backward'): raises(ZERO_DIM_MIX, PENDING),
    ('nextafter', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('nn.functional.adaptive_max_pool1d', '', '*', 'backward'): raises(ADAPTIVE_MAX_POOL, PENDING),
    ('nn.functional.adaptive_max_pool1d', '', '*', 'forward'): raises(ADAPTIVE_MAX_POOL, PENDING),
    ('nn.functional.adaptive_max_pool2d', '', '*', 'backward'): raises(ADAPTIVE_MAX_POOL, PENDING),
    ('nn.functional.adaptive_max_pool2d', '', '*', 'forward'): raises(ADAPTIVE_MAX_POOL, PENDING),
    ('nn.functional.embedding_bag', '', '*', 'backward'): raises(EMBEDDING_BAG_BACKWARD, PENDING_STRIDES),
    ('nn.functional.embedding_bag', '', '*', 'forward'): wrong(EMBEDDING_BAG, PENDING),
    ('nn.functional.nll_loss', '', '*', 'backward'): wrong("the backward ignores weight=", PENDING),
    ('polar', '', '*', 'backward'): raises(COMPLEX, PENDING),
    ('polar', '', '*', 'forward'): wrong(COMPLEX, PENDING),
    ('rand_like', '', '*', 'forward'): raises(RNG_0DIM, PENDING),
    ('randn_like', '', '*', 'forward'): raises(RNG_0DIM, PENDING),
    ('resize_', '', '*', 'forward'): raises(RESIZE),
    ('scalar_tensor', '', '*', 'forward'): raises(FILL, PENDING),
    ('sparse.mm', 'reduce', '*', 'backward'): raises(SPARSE_BACKWARD, PENDING),
    ('sparse.sampled_addmm', '', '*', 'backward'): raises(SPARSE_BACKWARD, PENDING),
    ('special.zeta', '', '*', 'forward'): raises(ZERO_DIM_MIX, PENDING),
    ('tensor_split', '', '*', 'backward'): raises(TENSOR_SPLIT),
    ('tensor_split', '', '*', 'forward'): raises(TENSOR_SPLIT),
    ('unfold', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('unfold', '', '*', 'forward'): raises(ZERO_DIM_DIM, PENDING),
    ('unfold_copy', '', '*', 'backward'): raises(ZERO_DIM_DIM, PENDING),
    ('unfold_copy', '', '*', 'forward'): raises(ZERO_DIM_DIM, PENDING),
}


def lookup(name: str, variant: str, dtype: str, direction: str) -> tuple[tuple, Gap] | None:
    for key in ((name, variant, dtype, direction), (name, variant, "*", direction)):
        if key in GAPS:
            return key, GAPS[key]
    return None
