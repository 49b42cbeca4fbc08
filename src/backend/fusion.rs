//! burn's `Fusion<B>` wrapper (the default `Wgpu` and `Cuda` types): the fused kernel of `B`
//! registered as one custom operation of the fusion stream.

use core::marker::PhantomData;

use burn::tensor::{
    DType, Int, Shape, Tensor, TensorMetadata,
    ops::{FloatTensor, FloatTensorOps, IntTensor},
};
use burn_fusion::{
    Fusion, FusionBackend, FusionRuntime,
    stream::{Operation, OperationStreams},
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use crate::{
    DistillBackend, DistillParams, DistillParts, FusedOutput, Reduction, SparseInputs, SparseSetup,
};

/// The custom operation: inputs `[student, teacher, targets]`, outputs
/// `[loss, soft, hard, grad]` (`targets`, `hard` and `grad` are placeholders when unused).
#[derive(Clone, Debug)]
struct FusedDistill<B> {
    desc: CustomOpIr,
    params: DistillParams,
    has_targets: bool,
    with_grad: bool,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + DistillBackend> Operation<B::FusionRuntime> for FusedDistill<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([student, teacher, targets], outputs) = self.desc.as_fixed();
        let student_t = handles.get_float_tensor::<B>(student);
        let teacher_t = handles.get_float_tensor::<B>(teacher);
        let targets_t = self
            .has_targets
            .then(|| handles.get_int_tensor::<B>(targets));
        let device = B::float_device(&student_t);
        // `Fusion::distill_fused` registers this operation only after `B::has_fused_kernel`
        // accepted the same inputs (it depends on their dtypes alone).
        let out = B::distill_fused(
            student_t,
            teacher_t,
            targets_t,
            &self.params,
            self.with_grad,
        )
        .unwrap_or_else(|| {
            panic!(
                "burn-distill: the fused kernel of {} refused its inputs",
                core::any::type_name::<B>()
            )
        });
        register_outputs::<B>(handles, outputs, out, &device);
    }
}

/// The sparse custom operation: inputs `[student, indices, log_probs, targets]` (the mask
/// already folded into the log-probabilities as `−∞`), outputs as [`FusedDistill`].
#[derive(Clone, Debug)]
struct FusedSparse<B> {
    desc: CustomOpIr,
    params: DistillParams,
    setup: SparseSetup,
    has_targets: bool,
    with_grad: bool,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + DistillBackend> Operation<B::FusionRuntime> for FusedSparse<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([student, indices, log_probs, targets], outputs) = self.desc.as_fixed();
        let student_t = handles.get_float_tensor::<B>(student);
        let teacher = SparseInputs {
            indices: handles.get_int_tensor::<B>(indices),
            log_probs: handles.get_float_tensor::<B>(log_probs),
            mask: None,
        };
        let targets_t = self
            .has_targets
            .then(|| handles.get_int_tensor::<B>(targets));
        let device = B::float_device(&student_t);
        // Registered only after `B::has_sparse_fused_kernel` accepted the same dtype and k.
        let out = B::distill_sparse_fused(
            student_t,
            teacher,
            targets_t,
            &self.params,
            self.setup,
            self.with_grad,
        )
        .unwrap_or_else(|| {
            panic!(
                "burn-distill: the sparse kernel of {} refused its inputs",
                core::any::type_name::<B>()
            )
        });
        register_outputs::<B>(handles, outputs, out, &device);
    }
}

/// Registers a kernel's `[loss, soft, hard, grad]` (placeholders for the missing ones).
fn register_outputs<B: FusionBackend>(
    handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    [loss, soft, hard, grad]: &[TensorIr; 4],
    out: FusedOutput<B>,
    device: &B::Device,
) {
    let placeholder = |ir: &TensorIr| B::float_zeros(ir.shape.clone(), device, ir.dtype.into());
    handles.register_float_tensor::<B>(&loss.id, out.parts.loss);
    handles.register_float_tensor::<B>(&soft.id, out.parts.soft);
    let hard_t = out.parts.hard.unwrap_or_else(|| placeholder(hard));
    handles.register_float_tensor::<B>(&hard.id, hard_t);
    let grad_t = out.grad.unwrap_or_else(|| placeholder(grad));
    handles.register_float_tensor::<B>(&grad.id, grad_t);
}

/// The four outputs of a fused operation on `[N, V]` logits of `dtype`.
fn output_irs<B: FusionBackend + DistillBackend>(
    client: &burn_fusion::client::GlobalFusionClient<B::FusionRuntime>,
    [n, v]: [usize; 2],
    dtype: DType,
    params: &DistillParams,
    with_grad: bool,
) -> [TensorIr; 4] {
    let rows: Shape = match params.reduction {
        Reduction::PerRow => [n].into(),
        _ => [1].into(),
    };
    let grad_shape: Shape = if with_grad {
        [n, v].into()
    } else {
        [1, 1].into()
    };
    let out = |shape: Shape, dtype| TensorIr::uninit(client.create_empty_handle(), shape, dtype);
    let loss_dtype = B::fused_loss_dtype(dtype);
    [
        out(rows.clone(), loss_dtype),
        out(rows.clone(), loss_dtype),
        out(rows, loss_dtype),
        out(grad_shape, B::fused_grad_dtype(dtype)),
    ]
}

/// The registered outputs as a [`FusedOutput`].
fn fused_output<B: FusionBackend>(
    outputs: Vec<FloatTensor<Fusion<B>>>,
    has_targets: bool,
    with_grad: bool,
) -> FusedOutput<Fusion<B>> {
    let [loss, soft, hard, grad]: [FloatTensor<Fusion<B>>; 4] =
        outputs.try_into().expect("four outputs");
    FusedOutput {
        parts: DistillParts {
            loss,
            soft,
            hard: has_targets.then_some(hard),
        },
        grad: with_grad.then_some(grad),
    }
}

impl<B: FusionBackend + DistillBackend> DistillBackend for Fusion<B> {
    fn fused_kernel_dtypes() -> &'static [DType] {
        B::fused_kernel_dtypes()
    }

    fn fused_loss_dtype(logits: DType) -> DType {
        B::fused_loss_dtype(logits)
    }

    fn fused_grad_dtype(logits: DType) -> DType {
        B::fused_grad_dtype(logits)
    }

    fn fused_kernel_fits(dims: [usize; 2], device: &Self::Device) -> bool {
        B::fused_kernel_fits(dims, device)
    }

    fn linear_chunk_bytes() -> usize {
        B::linear_chunk_bytes()
    }

    fn distill_fused(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        with_grad: bool,
    ) -> Option<FusedOutput<Self>> {
        let dims = student.shape();
        let (n, v) = (dims[0], dims[1]);
        if !Self::has_fused_kernel(&student, &teacher)
            || !B::fused_kernel_fits([n, v], &Self::float_device(&student))
        {
            return None;
        }
        let client = student.client.clone();
        let dtype = student.dtype();
        let has_targets = targets.is_some();
        let targets = targets.unwrap_or_else(|| {
            let device = Self::float_device(&student);
            Tensor::<Self, 1, Int>::zeros([n], &device).into_primitive()
        });
        let outputs = output_irs::<B>(&client, [n, v], dtype, params, with_grad);
        let streams = OperationStreams::with_inputs([&student, &teacher, &targets]);
        let desc = CustomOpIr::new(
            "burn_distill_fused",
            &[student.into_ir(), teacher.into_ir(), targets.into_ir()],
            &outputs,
        );
        let op = FusedDistill::<B> {
            desc: desc.clone(),
            params: *params,
            has_targets,
            with_grad,
            _backend: PhantomData,
        };
        let outputs = client.register(streams, OperationIr::Custom(desc), op);
        Some(fused_output(outputs, has_targets, with_grad))
    }

    fn has_sparse_fused_kernel(dtype: DType, k: usize) -> bool {
        B::has_sparse_fused_kernel(dtype, k)
    }

    fn distill_sparse_fused(
        student: FloatTensor<Self>,
        teacher: SparseInputs<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        setup: SparseSetup,
        with_grad: bool,
    ) -> Option<FusedOutput<Self>> {
        let dtype = student.dtype();
        let k = teacher.indices.shape()[1];
        let dims = student.shape();
        let (n, v) = (dims[0], dims[1]);
        if !B::has_sparse_fused_kernel(dtype, k)
            || !B::fused_kernel_fits([n, v], &Self::float_device(&student))
        {
            return None;
        }
        let client = student.client.clone();
        let device = Self::float_device(&student);
        let has_targets = targets.is_some();
        let targets =
            targets.unwrap_or_else(|| Tensor::<Self, 1, Int>::zeros([n], &device).into_primitive());
        let indices = teacher.indices.clone();
        let log_probs = teacher.folded_log_probs().into_primitive().tensor();
        let outputs = output_irs::<B>(&client, [n, v], dtype, params, with_grad);
        let streams = OperationStreams::with_inputs([&student, &indices, &log_probs, &targets]);
        let desc = CustomOpIr::new(
            "burn_distill_sparse",
            &[
                student.into_ir(),
                indices.into_ir(),
                log_probs.into_ir(),
                targets.into_ir(),
            ],
            &outputs,
        );
        let op = FusedSparse::<B> {
            desc: desc.clone(),
            params: *params,
            setup,
            has_targets,
            with_grad,
            _backend: PhantomData,
        };
        let outputs = client.register(streams, OperationIr::Custom(desc), op);
        Some(fused_output(outputs, has_targets, with_grad))
    }
}
