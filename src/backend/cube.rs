//! The CubeCL backends (wgpu, CUDA): launch of the kernel of [`crate::kernel::cube`] and the
//! reduction of its row outputs, on the device.

use burn::tensor::{
    DType, Int, Shape, Tensor as BurnTensor, TensorPrimitive, ops::FloatTensor, ops::IntTensor,
};
use burn_cubecl::{
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, kernel::into_contiguous,
    ops::numeric::empty_device_dtype, tensor::CubeTensor,
};
use cubecl::{prelude::*, server::CubeCountSelection, tensor_vector_size_parallel};

use super::{DistillBackend, DistillParams, DistillParts, FusedOutput};
use crate::kernel::cube::{BLOCK, DivKind, distill_kernel};
use crate::reduction::ignored_rows;

/// Row outputs of the kernel: `[N]` loss, soft, hard, and `[N, V]` gradient if asked.
pub(crate) struct CubeRows<R: CubeRuntime> {
    pub loss: CubeTensor<R>,
    pub soft: CubeTensor<R>,
    pub hard: CubeTensor<R>,
    pub grad: Option<CubeTensor<R>>,
}

/// Launches the kernel. `targets` must hold `[N]` class indices (or be `None`); `scale` is the
/// `[1]` f32 factor of the reduction that the gradient is multiplied by. Row outputs are f32,
/// the gradient has the logits' dtype.
pub(crate) fn launch<R: CubeRuntime>(
    student: CubeTensor<R>,
    teacher: CubeTensor<R>,
    targets: Option<CubeTensor<R>>,
    scale: CubeTensor<R>,
    params: &DistillParams,
    with_grad: bool,
) -> CubeRows<R> {
    let student = into_contiguous(student);
    let teacher = into_contiguous(teacher);
    let [n, v] = student.meta.shape().dims::<2>();
    let client = student.client.clone();
    let device = student.device.clone();
    let dtype = student.dtype;
    // Row values in f32 for every logit dtype: an f16 sum of row losses overflows at 65,504.
    let rows =
        || empty_device_dtype::<R>(client.clone(), device.clone(), Shape::new([n]), DType::F32);
    let (loss, soft, hard) = (rows(), rows(), rows());
    let grad_shape = if with_grad { [n, v] } else { [1, v] };
    let grad = empty_device_dtype::<R>(
        client.clone(),
        device.clone(),
        Shape::new(grad_shape),
        dtype,
    );
    let has_targets = targets.is_some();
    // Without labels the kernel reads (and ignores) a dummy `[N]` tensor of zeros.
    let targets = match targets {
        Some(t) => into_contiguous(t),
        None => burn_cubecl::ops::numeric::zeros_client::<R>(
            client.clone(),
            device.clone(),
            Shape::new([n]),
            DType::I32,
        ),
    };
    let (kind, mix) = DivKind::of(params.divergence);
    let t2 = params.soft_factor();
    let ignore = params
        .ignore_index
        .unwrap_or(0)
        .clamp(i32::MIN as i64, i32::MAX as i64) as i32;
    let i_dtype = targets.dtype;
    let (cube_dim, cube_count, width) = layout(&student);
    distill_kernel::launch::<R>(
        &client,
        cube_count,
        cube_dim,
        width,
        student.into_tensor_arg(),
        teacher.into_tensor_arg(),
        targets.into_tensor_arg(),
        scale.into_tensor_arg(),
        loss.clone().into_tensor_arg(),
        soft.clone().into_tensor_arg(),
        hard.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        (1.0 / params.temperature) as f32,
        t2 as f32,
        params.alpha as f32,
        params.label_smoothing as f32,
        mix,
        ignore,
        kind,
        has_targets,
        params.ignore_index.is_some(),
        with_grad,
        [dtype.into(), i_dtype.into()],
    );
    CubeRows {
        loss,
        soft,
        hard,
        grad: with_grad.then_some(grad),
    }
}

/// The launch layout of `[N, V]` contiguous logits: cube dimensions, cube count and vector
/// width.
///
/// Logits move as vectors of the widest width the device prefers for this dtype that divides
/// V (4 elements on wgpu; 1 for an odd V). A row's units are `V / width` rounded up to a power
/// of two, at most [`BLOCK`], and a cube holds `BLOCK / units` rows, so that a small vocabulary
/// does not leave most of a 256-unit cube idle. The cubes are spread over as many dimensions as
/// the device needs (wgpu allows 65,535 workgroups per dimension).
pub(crate) fn layout<R: CubeRuntime>(student: &CubeTensor<R>) -> (CubeDim, CubeCount, usize) {
    let [n, v] = student.meta.shape().dims::<2>();
    let width = tensor_vector_size_parallel(
        student
            .client
            .io_optimized_vector_sizes(student.dtype.size()),
        student.meta.shape(),
        student.meta.strides(),
        1,
    );
    let units = (v / width).next_power_of_two().min(BLOCK as usize) as u32;
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
    /// autocast does for its losses); the gradient keeps the logits' dtype.
    fn fused_loss_dtype(_logits: DType) -> DType {
        DType::F32
    }

    fn distill_fused(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        with_grad: bool,
    ) -> Option<FusedOutput<Self>> {
        if !Self::has_fused_kernel(&student, &teacher) {
            return None;
        }
        type T<B, const D: usize> = BurnTensor<B, D>;
        let [n, _v] = student.meta.shape().dims::<2>();
        let device = student.device.clone();
        let float = |t: CubeTensor<R>| T::<Self, 1>::from_primitive(TensorPrimitive::Float(t));
        // The reduction's factor, on the device (no synchronisation), in f32 (an f16 count
        // overflows at 65,504, a bf16 1/count is off by up to 0.4%); 1 per row for PerRow.
        let ignored = ignored_rows(
            targets
                .clone()
                .map(BurnTensor::<Self, 1, Int>::from_primitive)
                .as_ref(),
            params.ignore_index,
        );
        let factor = params
            .reduction
            .factor_tensor::<Self>(ignored, n, &device, DType::F32);
        let scale = factor
            .clone()
            .unwrap_or_else(|| T::full([1], 1.0, (&device, DType::F32)));
        let has_targets = targets.is_some();
        let rows = launch::<R>(
            student,
            teacher,
            targets,
            scale.clone().into_primitive().tensor(),
            params,
            with_grad,
        );
        let reduce = |t: CubeTensor<R>| -> FloatTensor<Self> {
            let rows = float(t);
            match &factor {
                None => rows,
                Some(factor) => rows.sum() * factor.clone(),
            }
            .into_primitive()
            .tensor()
        };
        Some(FusedOutput {
            parts: DistillParts {
                loss: reduce(rows.loss),
                soft: reduce(rows.soft),
                hard: has_targets.then(|| reduce(rows.hard)),
            },
            grad: rows.grad,
        })
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::tensor::{DType, Tensor};

    use super::layout;

    /// The launch layout: vector widths from V and the dtype, rows per cube from V.
    #[test]
    fn layout_follows_the_vocabulary() {
        type W = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
        let device = crate::testing::wgpu_device();
        let of = |n: usize, v: usize, dtype: DType| {
            let t = Tensor::<W, 2>::zeros([n, v], &device).cast(dtype);
            let (dim, _, width) = layout(&t.into_primitive().tensor());
            (width, dim.x, dim.y)
        };
        // Vectors of 4 where V allows (wgpu's widest, f32 and f16 alike); a row of 256 units
        // when V is large.
        assert_eq!(of(3, 32_000, DType::F32), (4, 256, 1));
        assert_eq!(of(3, 1032, DType::F16), (4, 256, 1));
        assert_eq!(of(3, 1030, DType::F32), (2, 256, 1));
        assert_eq!(of(3, 1031, DType::F32), (1, 256, 1));
        // Small vocabularies share a cube: V = 10 is 5 vectors of 2 on 8 units, 32 rows.
        assert_eq!(of(65_537, 10, DType::F32), (2, 8, 32));
        assert_eq!(of(2, 1, DType::F32), (1, 1, 256));
    }
}
