//! The CubeCL backends (wgpu, CUDA): launch of the kernels of [`crate::kernel::cube`] (dense)
//! and [`crate::kernel::sparse_cube`] (sparse teacher), and the reduction of their row
//! outputs, on the device.

use burn::tensor::{DType, Int, Shape, Tensor as BurnTensor, TensorPrimitive};
use burn_cubecl::{
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, kernel::into_contiguous,
    ops::numeric::empty_device_dtype, tensor::CubeTensor,
};
use cubecl::{
    ir::AddressType, prelude::*, server::CubeCountSelection, tensor_vector_size_parallel,
};

use super::{DenseCall, DistillBackend, DistillParams, DistillParts, FusedOutput, KernelCall};
use super::{SparseCall, SparseSetup};
use crate::kernel::cube::{BLOCK, DivKind, RowOutLaunch, RowParamsLaunch, RowSpec, distill_kernel};
use crate::kernel::sparse_cube::{TailKind, sparse_kernel};
use crate::reduction::{ignored_rows, pairwise_sum};

/// Row outputs of the kernel: `[N]` loss, soft, hard, and `[N, V]` gradient if asked.
pub(crate) struct CubeRows<R: CubeRuntime> {
    pub loss: CubeTensor<R>,
    pub soft: CubeTensor<R>,
    pub hard: CubeTensor<R>,
    pub grad: Option<CubeTensor<R>>,
}

/// The kernels' outputs: `[N]` f32 rows and the gradient in [`grad_dtype`] (`[N, V]`, or a
/// `[1, V]` placeholder without one).
struct RowOutputs<R: CubeRuntime> {
    loss: CubeTensor<R>,
    soft: CubeTensor<R>,
    hard: CubeTensor<R>,
    grad: CubeTensor<R>,
}

impl<R: CubeRuntime> RowOutputs<R> {
    fn new(student: &CubeTensor<R>, with_grad: bool) -> Self {
        let [n, v] = student.meta.shape().dims::<2>();
        let empty = |shape: [usize; 2], dtype| {
            let shape = if shape[1] == 0 {
                Shape::new([shape[0]])
            } else {
                Shape::new(shape)
            };
            empty_device_dtype::<R>(student.client.clone(), student.device.clone(), shape, dtype)
        };
        // Row values in f32 for every logit dtype: an f16 sum of row losses overflows at 65,504.
        Self {
            loss: empty([n, 0], DType::F32),
            soft: empty([n, 0], DType::F32),
            hard: empty([n, 0], DType::F32),
            grad: empty(
                if with_grad { [n, v] } else { [1, v] },
                grad_dtype(student.dtype),
            ),
        }
    }

    /// The kernels' `out` argument (the kernels write these tensors in place).
    fn arg<G: CubePrimitive>(&self) -> RowOutLaunch<G, R> {
        RowOutLaunch::new(
            self.loss.clone().into_tensor_arg(),
            self.soft.clone().into_tensor_arg(),
            self.hard.clone().into_tensor_arg(),
            self.grad.clone().into_tensor_arg(),
        )
    }

    fn into_rows(self, with_grad: bool) -> CubeRows<R> {
        CubeRows {
            loss: self.loss,
            soft: self.soft,
            hard: self.hard,
            grad: with_grad.then_some(self.grad),
        }
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

/// Whether there are targets, and the `[N]` targets (contiguous) or, without labels, a dummy
/// `[N]` tensor of zeros of dtype `dtype` that the kernel reads and ignores.
fn targets_or_zeros<R: CubeRuntime>(
    targets: Option<CubeTensor<R>>,
    student: &CubeTensor<R>,
    dtype: DType,
) -> (bool, CubeTensor<R>) {
    match targets {
        Some(t) => (true, into_contiguous(t)),
        None => (
            false,
            burn_cubecl::ops::numeric::zeros_client::<R>(
                student.client.clone(),
                student.device.clone(),
                Shape::new([student.meta.shape()[0]]),
                dtype,
            ),
        ),
    }
}

/// The kernels' run-time settings for `params`, and what they are specialised for.
fn row_params<R: CubeRuntime>(
    params: &DistillParams,
    labeled: bool,
    with_grad: bool,
) -> (RowParamsLaunch<R>, RowSpec) {
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
    );
    let spec = RowSpec {
        kind,
        labeled,
        with_ignore: params.ignore_index.is_some(),
        with_grad,
    };
    (settings, spec)
}

/// A kernel call on CubeCL tensors (the backend type only names the tensors: `i32` targets);
/// `T` is the teacher's inputs.
type CubeCall<R, T> = KernelCall<CubeBackend<R, f32, i32, u8>, CubeTensor<R>, T, DistillParams>;

/// Launches the kernel. `call.targets` must hold `[N]` `i32` class indices (or be `None`);
/// `scale` is the `[1]` f32 factor of the reduction that the gradient is multiplied by. Row
/// outputs are f32, the gradient has the logits' dtype.
pub(crate) fn launch<R: CubeRuntime>(
    call: CubeCall<R, CubeTensor<R>>,
    scale: CubeTensor<R>,
) -> CubeRows<R> {
    let KernelCall {
        student,
        teacher,
        targets,
        settings: ref params,
        with_grad,
    } = call;
    let student = into_contiguous(student);
    let teacher = into_contiguous(teacher);
    let outputs = RowOutputs::new(&student, with_grad);
    let (has_targets, targets) = targets_or_zeros(targets, &student, DType::I32);
    let (row_params, spec) = row_params(params, has_targets, with_grad);
    let dtypes = [
        student.dtype.into(),
        targets.dtype.into(),
        outputs.grad.dtype.into(),
    ];
    let (cube_dim, cube_count, width) = layout(&student);
    let address = address_type(student.meta.shape().dims::<2>());
    distill_kernel::launch::<R>(
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
    outputs.into_rows(with_grad)
}

/// The address type of the kernels' offsets for `[N, V]` logits (the type of `usize` in the
/// kernels, as in burn's own kernels): 32 bits while every element offset of the logits and
/// the gradient, at most `N·V − 1`, fits in `u32`; 64 bits beyond (an odd V = 50,257 with
/// 86k rows: 4.3·10⁹ elements, 8.6 GB in bf16, which fits on one GPU), where 32-bit offsets
/// would wrap and put rows' gradients into other rows.
pub(crate) fn address_type([n, v]: [usize; 2]) -> AddressType {
    AddressType::from_len(n.saturating_mul(v))
}

/// Can the kernels run on `[N, V]` logits on this device? (Offsets past `u32` need a device
/// with 64-bit addresses; where it has none, the composed reference runs instead.)
pub(crate) fn kernel_fits<R: CubeRuntime>(dims: [usize; 2], device: &R::Device) -> bool {
    let needed = address_type(dims);
    needed == AddressType::U32 || R::client(device).properties().supports_address(needed)
}

/// The widest vector the device prefers for these contiguous `[N, V]` logits that divides V.
fn vector_width<R: CubeRuntime>(student: &CubeTensor<R>) -> usize {
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
pub(crate) fn layout<R: CubeRuntime>(student: &CubeTensor<R>) -> (CubeDim, CubeCount, usize) {
    let [n, v] = student.meta.shape().dims::<2>();
    let width = vector_width(student);
    // At least `VECTORS_PER_UNIT` vectors per unit, so that a row's reductions (a few barriers
    // each) do not outweigh its loads.
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

impl<R, F, I, BT> DistillBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn fused_kernel_dtypes() -> &'static [DType] {
        &[DType::F32, DType::F16, DType::BF16]
    }

    /// Losses are accumulated, reduced and returned in f32 for every logit dtype (as PyTorch's
    /// autocast does for its losses); the gradient's dtype is `fused_grad_dtype`'s.
    fn fused_loss_dtype(_logits: DType) -> DType {
        DType::F32
    }

    /// Past `u32` offsets only where the device has 64-bit addresses (`kernel_fits`).
    fn fused_kernel_fits(dims: [usize; 2], device: &Self::Device) -> bool {
        kernel_fits::<R>(dims, device)
    }

    /// f32 for f16 logits (see `grad_dtype`), the logits' dtype otherwise.
    fn fused_grad_dtype(logits: DType) -> DType {
        grad_dtype(logits)
    }

    /// 512 MiB: on a GPU each chunk also pays a full `[H, V]` weight-gradient product and sum
    /// (burn has no accumulating matmul) and a launch of every op, so chunks of a few dozen
    /// rows at a 128k vocabulary would spend more time there than in the loss.
    fn linear_chunk_bytes() -> usize {
        512 << 20
    }

    fn distill_fused(call: DenseCall<Self>) -> Option<FusedOutput<Self>> {
        if !Self::has_fused_kernel(&call.student, &call.teacher) || !fits(&call.student) {
            return None;
        }
        let call: CubeCall<R, _> = call.map(|s, t, y| (s, t, y.map(as_i32::<R, F, I, BT, 1>)));
        let reduction =
            Reduced::<R, F, I, BT>::new(&call.student, call.targets.as_ref(), &call.settings);
        let has_targets = call.targets.is_some();
        let rows = launch::<R>(call, reduction.scale());
        Some(reduction.finish(rows, has_targets))
    }

    /// The sparse kernel takes `k ≤ MAX_SPARSE_K` entries per row (the row's entries live in
    /// shared memory); the reference runs beyond.
    fn has_sparse_fused_kernel(dtype: DType, k: usize) -> bool {
        Self::fused_kernel_dtypes().contains(&dtype) && k <= MAX_SPARSE_K
    }

    fn distill_sparse_fused(call: SparseCall<Self>) -> Option<FusedOutput<Self>> {
        let k = call.teacher.indices.meta.shape()[1];
        if !Self::has_sparse_fused_kernel(call.student.dtype, k) || !fits(&call.student) {
            return None;
        }
        let call: CubeCall<R, _> = call.map(|s, t, y| {
            let indices = as_i32::<R, F, I, BT, 2>(t.indices.clone());
            let setup = t.setup;
            let log_probs = t.folded_log_probs();
            // A NaN log-probability as +∞: the kernel's "above 0" test then makes its row NaN
            // (a comparison with NaN is false, and the entry would pass for missing).
            let log_probs = log_probs
                .clone()
                .mask_fill(log_probs.is_nan(), f32::INFINITY);
            let teacher = (indices, log_probs.into_primitive().tensor(), setup);
            (s, teacher, y.map(as_i32::<R, F, I, BT, 1>))
        });
        let reduction =
            Reduced::<R, F, I, BT>::new(&call.student, call.targets.as_ref(), &call.settings);
        let has_targets = call.targets.is_some();
        let rows = launch_sparse::<R>(call, reduction.scale());
        Some(reduction.finish(rows, has_targets))
    }
}

/// Can the kernels run on these `[N, V]` logits on their device?
fn fits<R: CubeRuntime>(student: &CubeTensor<R>) -> bool {
    kernel_fits::<R>(student.meta.shape().dims::<2>(), &student.device)
}

/// Class and token indices as the kernels' `i32`: a wider int is clamped first, so that a
/// value outside `i32` stays out of range (and its row NaN) instead of wrapping into it.
fn as_i32<R, F, I, BT, const D: usize>(t: CubeTensor<R>) -> CubeTensor<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if t.dtype == DType::I32 {
        return t;
    }
    BurnTensor::<CubeBackend<R, F, I, BT>, D, Int>::from_primitive(t)
        .clamp(i32::MIN as i64, i32::MAX as i64)
        .cast(DType::I32)
        .into_primitive()
}

/// The most teacher entries per row of the sparse kernel (its shared memory: 24 bytes each).
pub(crate) const MAX_SPARSE_K: usize = 512;

/// Launches the sparse kernel (see [`launch`]): `[N, k]` indices, `[N, k]` f32
/// log-probabilities (`−∞` where missing).
pub(crate) fn launch_sparse<R: CubeRuntime>(
    call: CubeCall<R, (CubeTensor<R>, CubeTensor<R>, SparseSetup)>,
    scale: CubeTensor<R>,
) -> CubeRows<R> {
    let KernelCall {
        student,
        teacher: (indices, log_probs, setup),
        targets,
        settings: ref params,
        with_grad,
    } = call;
    let student = into_contiguous(student);
    let n = student.meta.shape()[0];
    let k = indices.meta.shape()[1];
    let outputs = RowOutputs::new(&student, with_grad);
    // One int dtype for indices and targets (the kernel's `I`).
    let (has_targets, targets) = targets_or_zeros(targets, &student, indices.dtype);
    let (row_params, spec) = row_params(params, has_targets, with_grad);
    let dtypes = [
        student.dtype.into(),
        indices.dtype.into(),
        outputs.grad.dtype.into(),
    ];
    let client = student.client.clone();
    let cube_count = CubeCountSelection::new(&client, n as u32).cube_count();
    let width = vector_width(&student);
    let address = address_type(student.meta.shape().dims::<2>());
    sparse_kernel::launch::<R>(
        &client,
        cube_count,
        CubeDim::new_1d(BLOCK),
        address,
        width,
        student.into_tensor_arg(),
        into_contiguous(indices).into_tensor_arg(),
        into_contiguous(log_probs).into_tensor_arg(),
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
    outputs.into_rows(with_grad)
}

/// The reduction of a fused kernel's f32 row outputs, on the device (no synchronisation): its
/// factor in f32 (an f16 count overflows at 65,504, a bf16 `1/count` is off by up to 0.4%), or
/// none for `PerRow`.
struct Reduced<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> {
    factor: Option<BurnTensor<CubeBackend<R, F, I, BT>, 1>>,
    device: R::Device,
}

impl<R, F, I, BT> Reduced<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn new(
        student: &CubeTensor<R>,
        targets: Option<&CubeTensor<R>>,
        params: &DistillParams,
    ) -> Self {
        let n = student.meta.shape()[0];
        let device = student.device.clone();
        let ignored = ignored_rows(
            targets
                .cloned()
                .map(BurnTensor::<CubeBackend<R, F, I, BT>, 1, Int>::from_primitive)
                .as_ref(),
            params.ignore_index,
        );
        let factor = params.reduction.factor_tensor::<CubeBackend<R, F, I, BT>>(
            ignored,
            n,
            &device,
            DType::F32,
        );
        Self { factor, device }
    }

    /// The `[1]` factor the kernel multiplies the gradient by (1 for `PerRow`).
    fn scale(&self) -> CubeTensor<R> {
        self.factor
            .clone()
            .unwrap_or_else(|| BurnTensor::full([1], 1.0, (&self.device, DType::F32)))
            .into_primitive()
            .tensor()
    }

    /// The reduced loss and parts of the kernel's rows, and its gradient.
    fn finish(
        &self,
        rows: CubeRows<R>,
        has_targets: bool,
    ) -> FusedOutput<CubeBackend<R, F, I, BT>> {
        let reduce = |t: CubeTensor<R>| -> CubeTensor<R> {
            let rows = BurnTensor::<CubeBackend<R, F, I, BT>, 1>::from_primitive(
                TensorPrimitive::Float(t),
            );
            match &self.factor {
                None => rows,
                // Pairwise: f32 rounding stays near one value's at any N.
                Some(factor) => pairwise_sum(rows) * factor.clone(),
            }
            .into_primitive()
            .tensor()
        };
        FusedOutput {
            parts: DistillParts {
                loss: reduce(rows.loss),
                soft: reduce(rows.soft),
                hard: has_targets.then(|| reduce(rows.hard)),
            },
            grad: rows.grad,
        }
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::tensor::{DType, Tensor};

    use super::{address_type, layout};
    use cubecl::ir::AddressType;

    /// The kernels' offsets past `u32`: 86,000 rows of an odd V = 50,257 (8.6 GB in bf16) have
    /// element offsets up to 4,322,101,999, which 32-bit arithmetic would wrap to 27,134,703
    /// (inside row 539: another row's gradient); the launch takes 64-bit addresses there, and
    /// 32-bit ones up to exactly `u32::MAX` elements. Checked without allocating the tensors.
    #[test]
    fn offsets_past_u32_take_64_bit_addresses() {
        let (n, v) = (86_000usize, 50_257usize);
        let last = n * v - 1;
        assert_eq!(last, 4_322_101_999);
        assert_eq!(last as u32 as usize, 27_134_703);
        assert_eq!(27_134_703 / v, 539);
        assert_eq!(address_type([n, v]), AddressType::U64);
        assert_eq!(address_type([85_000, 50_257]), AddressType::U32);
        // The boundary: `u32::MAX` elements still fit (offsets up to `u32::MAX − 1`).
        assert_eq!(address_type([65_535, 65_537]), AddressType::U32);
        assert_eq!(address_type([65_536, 65_536]), AddressType::U64);
        assert_eq!(address_type([usize::MAX, 3]), AddressType::U64);
    }

    /// The launch layout: vector widths from V and the dtype, rows per cube from V.
    #[test]
    fn layout_follows_the_vocabulary() {
        type W = burn::backend::wgpu::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;
        let device = crate::testing::wgpu_device();
        let of = |n: usize, v: usize, dtype: DType| {
            let t = Tensor::<W, 2>::zeros([n, v], &device).cast(dtype);
            let (dim, _, width) = layout(&t.into_primitive().tensor());
            (width, dim.x, dim.y)
        };
        // Vectors of 4 where V allows (wgpu's widest, f32 and f16 alike), 2 or 1 otherwise; a
        // row of 256 units when V is large (at least 8 vectors each).
        assert_eq!(of(3, 32_000, DType::F32), (4, 256, 1));
        assert_eq!(of(3, 8192, DType::F16), (4, 256, 1));
        assert_eq!(of(3, 1030, DType::F32), (2, 128, 2));
        assert_eq!(of(3, 2049, DType::F32), (1, 256, 1));
        // Small vocabularies share a cube: V = 1000 is 250 vectors of 4 on 32 units, 8 rows;
        // V = 10 is 5 vectors of 2 on one unit, 256 rows.
        assert_eq!(of(3, 1000, DType::F32), (4, 32, 8));
        assert_eq!(of(65_537, 10, DType::F32), (2, 1, 256));
        assert_eq!(of(2, 1, DType::F32), (1, 1, 256));
    }
}
