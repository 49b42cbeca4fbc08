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

use crate::{DistillBackend, DistillParams, DistillParts, FusedOutput, Reduction};

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
        let ([student, teacher, targets], [loss, soft, hard, grad]) = self.desc.as_fixed();
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
        let placeholder =
            |ir: &TensorIr| B::float_zeros(ir.shape.clone(), &device, ir.dtype.into());
        handles.register_float_tensor::<B>(&loss.id, out.parts.loss);
        handles.register_float_tensor::<B>(&soft.id, out.parts.soft);
        let hard_t = out.parts.hard.unwrap_or_else(|| placeholder(hard));
        handles.register_float_tensor::<B>(&hard.id, hard_t);
        let grad_t = out.grad.unwrap_or_else(|| placeholder(grad));
        handles.register_float_tensor::<B>(&grad.id, grad_t);
    }
}

impl<B: FusionBackend + DistillBackend> DistillBackend for Fusion<B> {
    fn fused_kernel_dtypes() -> &'static [DType] {
        B::fused_kernel_dtypes()
    }

    fn fused_loss_dtype(logits: DType) -> DType {
        B::fused_loss_dtype(logits)
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
        let client = student.client.clone();
        let dims = student.shape();
        let (n, v) = (dims[0], dims[1]);
        let dtype = student.dtype();
        let has_targets = targets.is_some();
        let targets = targets.unwrap_or_else(|| {
            let device = Self::float_device(&student);
            Tensor::<Self, 1, Int>::zeros([n], &device).into_primitive()
        });
        let rows: Shape = match params.reduction {
            Reduction::PerRow => [n].into(),
            _ => [1].into(),
        };
        let grad_shape: Shape = if with_grad {
            [n, v].into()
        } else {
            [1, 1].into()
        };
        let out =
            |shape: Shape, dtype| TensorIr::uninit(client.create_empty_handle(), shape, dtype);
        let loss_dtype = B::fused_loss_dtype(dtype);
        let outputs = [
            out(rows.clone(), loss_dtype),
            out(rows.clone(), loss_dtype),
            out(rows, loss_dtype),
            out(grad_shape, dtype),
        ];
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
        let [loss, soft, hard, grad]: [FloatTensor<Self>; 4] = client
            .register(streams, OperationIr::Custom(desc), op)
            .try_into()
            .expect("four outputs");
        Some(FusedOutput {
            parts: DistillParts {
                loss,
                soft,
                hard: has_targets.then_some(hard),
            },
            grad: with_grad.then_some(grad),
        })
    }
}
