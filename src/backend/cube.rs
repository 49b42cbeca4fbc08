//! The CubeCL backends (wgpu, CUDA, and every other CubeCL runtime): launch of the kernel of
//! [`crate::kernel::cube`] and the reduction of its row outputs, on the device.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::{FloatTensorOps, IntTensorOps};
use burn::tensor::{DType, IntDType, Shape, Slice};
use burn_cubecl::{
    CubeBackend, kernel::into_contiguous, ops::numeric::empty_device_contiguous_dtype,
    ops::numeric::zeros_client, tensor::CubeTensor,
};
use cubecl::{
    ir::AddressType, prelude::*, server::CubeCountSelection, tensor_vector_size_parallel,
};

use super::ops::{DenseSettings, DistillOps, FusedRows, SparseSetup};
use crate::DistillParams;
use crate::kernel::cube::{BLOCK, DivKind, RowOutLaunch, RowParamsLaunch, RowSpec, distill_kernel};
use crate::kernel::sparse_cube::{TailKind, sparse_kernel};

/// The logit dtypes of the CubeCL kernel (accumulating in f32).
pub(super) const CUBE_DTYPES: &[DType] = &[DType::F32, DType::F16, DType::BF16];

/// The kernels' outputs: `[N]` f32 rows and the gradient in [`grad_dtype`] (`[N, V]`, or a
/// `[1, V]` placeholder without one).
struct RowOutputs {
    loss: CubeTensor,
    soft: CubeTensor,
    hard: CubeTensor,
    grad: CubeTensor,
}

impl RowOutputs {
    fn new(student: &CubeTensor, with_grad: bool) -> Self {
        let [n, v] = student.meta.shape().dims::<2>();
        let empty = |shape: Shape, dtype| {
            empty_device_contiguous_dtype(
                student.client.clone(),
                student.device.clone(),
                shape,
                dtype,
            )
        };
        // Row values in f32 for every logit dtype: an f16 sum of row losses overflows at 65,504.
        Self {
            loss: empty(Shape::new([n]), DType::F32),
            soft: empty(Shape::new([n]), DType::F32),
            hard: empty(Shape::new([n]), DType::F32),
            grad: empty(
                Shape::new(if with_grad { [n, v] } else { [1, v] }),
                grad_dtype(student.dtype),
            ),
        }
    }

    /// The kernels' `out` argument (the kernels write these tensors in place).
    fn arg<G: CubePrimitive>(&self) -> RowOutLaunch<G> {
        RowOutLaunch::new(
            self.loss.clone().into_tensor_arg(),
            self.soft.clone().into_tensor_arg(),
            self.hard.clone().into_tensor_arg(),
            self.grad.clone().into_tensor_arg(),
        )
    }
}

/// The dtype of the fused kernels' gradient for logits of `dtype`: f32 for f16, whose range
/// ends at 6e-8 (an entry of `1/N · (q − p)` below it is flushed to 0 before the backward pass
/// multiplies by the upstream gradient, and a loss scale of 65,536 is `+∞` in f16); the
/// logits' own otherwise (bf16 has f32's range).
pub(crate) fn grad_dtype(dtype: DType) -> DType {
    if dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    }
}

/// The kernels' run-time settings for `params`, and what they are specialised for.
fn row_params(
    params: &DistillParams,
    labeled: bool,
    with_grad: bool,
) -> (RowParamsLaunch, RowSpec) {
    let (kind, mix) = DivKind::of(params.divergence);
    // The ignore index as an `i32` (any value when there is none).
    let ignore = params
        .ignore_index
        .unwrap_or(0)
        .clamp(i32::MIN as i64, i32::MAX as i64) as i32;
    let settings = RowParamsLaunch::new(
        (1.0 / params.temperature) as f32,
        params.soft_factor() as f32,
        params.alpha as f32,
        params.label_smoothing as f32,
        mix,
        ignore,
        f32::NAN,
        f32::NEG_INFINITY,
    );
    let spec = RowSpec {
        kind,
        labeled,
        with_ignore: params.ignore_index.is_some(),
        with_grad,
    };
    (settings, spec)
}

/// Launches the dense kernel on contiguous logits; `targets` are `[N]` `i32` class indices
/// (`[N]` zeros without labels); `scale` is the `[1]` f32 factor of the reduction that the
/// gradient is multiplied by.
fn launch(
    student: CubeTensor,
    teacher: CubeTensor,
    targets: CubeTensor,
    scale: CubeTensor,
    settings: &DenseSettings,
) -> RowOutputs {
    let outputs = RowOutputs::new(&student, settings.with_grad);
    let (row_params, spec) = row_params(&settings.params, settings.labels, settings.with_grad);
    let dtypes = [
        dtype_to_storage_type(student.dtype),
        dtype_to_storage_type(targets.dtype),
        dtype_to_storage_type(outputs.grad.dtype),
    ];
    let (cube_dim, cube_count, width) = layout(&student);
    let address = address_type(student.meta.shape().dims::<2>());
    distill_kernel::launch(
        &student.client.clone(),
        cube_count,
        cube_dim,
        address,
        width,
        student.into_tensor_arg(),
        teacher.into_tensor_arg(),
        targets.into_tensor_arg(),
        scale.into_tensor_arg(),
        outputs.arg(),
        row_params,
        spec,
        dtypes,
    );
    outputs
}

/// Launches the sparse kernel (see [`launch`]): `[N, k]` `i32` indices, `[N, k]` f32
/// log-probabilities (`−∞` where missing, `+∞` for a NaN).
fn launch_sparse(
    student: CubeTensor,
    (indices, log_probs): (CubeTensor, CubeTensor),
    targets: CubeTensor,
    scale: CubeTensor,
    settings: &DenseSettings,
    setup: SparseSetup,
) -> RowOutputs {
    let params = &settings.params;
    let n = student.meta.shape()[0];
    let k = indices.meta.shape()[1];
    let outputs = RowOutputs::new(&student, settings.with_grad);
    let (row_params, spec) = row_params(params, settings.labels, settings.with_grad);
    let dtypes = [
        dtype_to_storage_type(student.dtype),
        dtype_to_storage_type(indices.dtype),
        dtype_to_storage_type(outputs.grad.dtype),
    ];
    let client = student.client.clone();
    let cube_count = CubeCountSelection::new(&client, n as u32).cube_count();
    let width = vector_width(&student);
    let address = address_type(student.meta.shape().dims::<2>());
    sparse_kernel::launch(
        &client,
        cube_count,
        CubeDim::new_1d(BLOCK),
        address,
        width,
        student.into_tensor_arg(),
        indices.into_tensor_arg(),
        log_probs.into_tensor_arg(),
        targets.into_tensor_arg(),
        scale.into_tensor_arg(),
        outputs.arg(),
        row_params,
        (setup.generation_temperature / params.temperature) as f32,
        spec,
        TailKind::of(setup.tail),
        k,
        dtypes,
    );
    outputs
}

/// The address type of the kernels' offsets for `[N, V]` logits (the type of `usize` in the
/// kernels, as in burn's own kernels): 32 bits while every element offset of the logits and
/// the gradient, at most `N·V − 1`, fits in `u32`; 64 bits beyond (an odd V = 50,257 with
/// 86k rows: 4.3·10⁹ elements, 8.6 GB in bf16, which fits on one GPU), where 32-bit offsets
/// would wrap and put rows' gradients into other rows.
pub(crate) fn address_type([n, v]: [usize; 2]) -> AddressType {
    AddressType::from_len(n.saturating_mul(v))
}

/// The widest vector the device prefers for these contiguous `[N, V]` logits that divides V.
fn vector_width(student: &CubeTensor) -> usize {
    tensor_vector_size_parallel(
        student
            .client
            .io_optimized_vector_sizes(student.dtype.size()),
        student.meta.shape(),
        student.meta.strides(),
        1,
    )
}

/// The fewest vectors a unit of the dense kernel loads per pass when V allows.
const VECTORS_PER_UNIT: usize = 8;

/// The launch layout of `[N, V]` contiguous logits: cube dimensions, cube count and vector
/// width.
///
/// Logits move as vectors of the widest width the device prefers for this dtype that divides
/// V (4 elements on wgpu; 1 for an odd V). A row's units are `V / width / VECTORS_PER_UNIT`
/// rounded up to a power of two, at most [`BLOCK`], and a cube holds `BLOCK / units` rows, so that
/// a small vocabulary does not leave most of a 256-unit cube idle. The cubes are spread over as
/// many dimensions as the device needs (wgpu allows 65,535 workgroups per dimension).
pub(crate) fn layout(student: &CubeTensor) -> (CubeDim, CubeCount, usize) {
    let [n, v] = student.meta.shape().dims::<2>();
    let width = vector_width(student);
    let units = (v / width)
        .div_ceil(VECTORS_PER_UNIT)
        .next_power_of_two()
        .min(BLOCK as usize) as u32;
    let rows = BLOCK / units;
    let cube_dim = CubeDim::new_2d(units, rows);
    let cubes = n.div_ceil(rows as usize);
    let cube_count = CubeCountSelection::new(&student.client, cubes as u32).cube_count();
    (cube_dim, cube_count, width)
}

impl DistillOps for CubeBackend {
    fn distill_dense(
        student: CubeTensor,
        teacher: CubeTensor,
        targets: CubeTensor,
        scale: CubeTensor,
        settings: DenseSettings,
    ) -> FusedRows<Self> {
        let (student, teacher) = (into_contiguous(student), into_contiguous(teacher));
        let targets = kernel_targets(targets, &student, &settings);
        let scale = into_contiguous(Self::float_cast(scale, DType::F32.into()));
        let rows = launch(student, teacher, targets, scale.clone(), &settings);
        rows.reduce(&settings, scale)
    }

    fn distill_sparse(
        student: CubeTensor,
        indices: CubeTensor,
        log_probs: CubeTensor,
        targets: CubeTensor,
        scale: CubeTensor,
        settings: DenseSettings,
        setup: SparseSetup,
    ) -> FusedRows<Self> {
        type B = CubeBackend;
        let student = into_contiguous(student);
        let targets = kernel_targets(targets, &student, &settings);
        let indices = into_contiguous(as_i32(indices));
        // f32 log-probabilities (a NaN is already +∞: see `backend::sparse`).
        let log_probs = into_contiguous(B::float_cast(log_probs, DType::F32.into()));
        let scale = into_contiguous(B::float_cast(scale, DType::F32.into()));
        let teacher = (indices, log_probs);
        let rows = launch_sparse(student, teacher, targets, scale.clone(), &settings, setup);
        rows.reduce(&settings, scale)
    }

    fn distill_attach(
        value: CubeTensor,
        _a: CubeTensor,
        _ga: CubeTensor,
        _b: CubeTensor,
        _gb: CubeTensor,
        _c: CubeTensor,
        _gc: CubeTensor,
        _present: [bool; 3],
    ) -> CubeTensor {
        value
    }

    fn distill_scale_grad(grad: CubeTensor, upstream: CubeTensor) -> CubeTensor {
        let n = upstream.meta.shape()[0];
        let upstream = Self::float_reshape(upstream, Shape::new([n, 1]));
        let upstream = Self::float_cast(upstream, grad.dtype.into());
        Self::float_mul(grad, upstream)
    }
}

/// The kernels' targets: `[N]` contiguous `i32` class indices, or `[N]` zeros without labels
/// (read and ignored).
fn kernel_targets(
    targets: CubeTensor,
    student: &CubeTensor,
    settings: &DenseSettings,
) -> CubeTensor {
    if settings.labels {
        return into_contiguous(as_i32(targets));
    }
    zeros_client(
        student.client.clone(),
        student.device.clone(),
        Shape::new([student.meta.shape()[0]]),
        DType::I32,
    )
}

impl RowOutputs {
    /// The rows reduced as the settings say (pairwise sums times the `[1]` factor `scale`;
    /// as they are for `PerRow`), and the gradient.
    fn reduce(self, settings: &DenseSettings, scale: CubeTensor) -> FusedRows<CubeBackend> {
        let reduce = |t: CubeTensor| match settings.params.reduction.factor(1) {
            None => t,
            Some(_) => CubeBackend::float_mul(pairwise_sum(t), scale.clone()),
        };
        FusedRows {
            loss: reduce(self.loss),
            soft: reduce(self.soft),
            hard: reduce(self.hard),
            grad: self.grad,
        }
    }
}

/// `Σ rows` as `[1]`, summed pairwise by element-wise additions of halves (see
/// `crate::reduction::pairwise_sum`: no reduce kernel, whose wgpu version dropped elements past
/// about 65,532 in burn 0.21).
fn pairwise_sum(rows: CubeTensor) -> CubeTensor {
    type B = CubeBackend;
    let n = rows.meta.shape()[0];
    if n <= 2 {
        return B::float_sum(rows);
    }
    let p = n.next_power_of_two();
    let mut t = if p > n {
        let zeros = B::float_zeros(Shape::new([p - n]), &rows.device, rows.dtype.into());
        B::float_cat(vec![rows, zeros], 0)
    } else {
        rows
    };
    let mut len = p;
    while len > 1 {
        len /= 2;
        let low = B::float_slice(t.clone(), &[Slice::new(0, Some(len as isize), 1)]);
        let high = B::float_slice(t, &[Slice::new(len as isize, Some(2 * len as isize), 1)]);
        t = B::float_add(low, high);
    }
    t
}

/// Class indices as the kernel's `i32`: a wider int is clamped first, so that a value outside
/// `i32` stays out of range (and its row NaN) instead of wrapping into it.
fn as_i32(t: CubeTensor) -> CubeTensor {
    if t.dtype == DType::I32 {
        return t;
    }
    let t = CubeBackend::int_clamp(t, (i32::MIN as i64).into(), (i32::MAX as i64).into());
    CubeBackend::int_cast(t, IntDType::I32)
}
